"""Pipeline stage layout and the choice between tensor parallelism and stages (pure)."""

import pytest

from cmatrix.errors import InputError
from cmatrix.llm import stages as st

HOSTS = ["pc", "pc", "laptop", "desk"]


def test_stages_go_by_host_with_the_drivers_host_last():
    assert st.by_host(HOSTS, [0.25] * 4) == [(2,), (3,), (0, 1)]
    assert st.by_host(HOSTS, [0.5, 0.0, 0.5, 0.0]) == [(2,), (0,)]  # a rank with no share is in none


def test_layers_follow_each_stage_speed_and_memory():
    assert st.layer_counts(8, [1, 1]) == [4, 4]
    assert st.layer_counts(8, [3, 1]) == [6, 2]
    assert st.layer_counts(4, [1, 0, 0]) == [2, 1, 1]  # every stage at least one layer
    assert st.layer_counts(8, [3, 1], limits=[5, 8]) == [5, 3]  # memory caps the faster
    with pytest.raises(InputError, match="only 2 layers"):
        st.layer_counts(2, [1, 1, 1])
    with pytest.raises(InputError, match="memory holds"):
        st.layer_counts(8, [1, 1], limits=[3, 3])


def test_a_plan_covers_every_layer_once_in_order():
    stages = st.plan(HOSTS, [0.4, 0.2, 0.2, 0.2], 12)
    assert [s.ranks for s in stages] == [(2,), (3,), (0, 1)]
    assert stages[0].first == 0 and stages[-1].end == 12
    assert all(a.end == b.first for a, b in zip(stages, stages[1:], strict=False))
    assert [s.end - s.first for s in stages] == [3, 2, 7]  # the driver's host has 0.6 of the shares
    assert st.layer_weights(stages, [0.4, 0.2, 0.2, 0.2], 0) == [0, 0, 0.2, 0]
    assert st.layer_weights(stages, [0.4, 0.2, 0.2, 0.2], None) == [0.4, 0.2, 0, 0]  # the LM head
    assert "stage 3: ranks 0,1 on pc, layers 5-11 + LM head" in st.describe(stages, HOSTS)


def test_one_host_gets_a_stage_per_rank():
    assert [s.ranks for s in st.plan(["a"] * 3, [1, 1, 1], 6)] == [(1,), (2,), (0,)]


def _choice(allreduce, trip, rate):
    hosts = ["a", "b"]
    links = st.Links(allreduce, {"b": trip}, {"b": rate})
    return st.choose(hosts, [0.5, 0.5], [1e9, 1e9], 8, 1e8, 8192, 128000, links)


def test_auto_picks_stages_on_a_slow_link_and_tensor_parallelism_on_a_fast_one():
    # 100 MB at 2 GB/s in all: 50 ms tensor-parallel, 100 ms in two stages before the links
    mode, stages, why = _choice(allreduce=10e-3, trip=4e-3, rate=12.5e6)  # Wi-Fi: 16 x 10 ms
    assert mode == "pp" and len(stages) == 2 and "ms/token" in why
    mode, _, _ = _choice(allreduce=50e-6, trip=100e-6, rate=1e9)  # a fast LAN
    assert mode == "tp"


def test_a_bad_mode_is_refused():
    with pytest.raises(InputError, match="parallel"):
        st.check_mode("pipeline")


def test_stage_fractions_are_what_each_rank_holds_of_the_model():
    stages = st.plan(HOSTS, [0.4, 0.2, 0.2, 0.2], 12)  # layers 0-2 on rank 2, 3-4 on 3, 5-11 on 0 and 1
    got = st.stage_fractions(stages, [0.4, 0.2, 0.2, 0.2], 12)
    assert got == pytest.approx([7 / 12 * 2 / 3, 7 / 12 / 3, 3 / 12, 2 / 12])
    assert sum(got) == pytest.approx(1.0)


def test_predictions_follow_the_shares_given():
    links = st.Links(1e-3, {"b": 2e-3}, {"b": 1e8})
    hosts, speeds = ["a", "b"], [1e9, 1e9]
    stages = st.plan(hosts, [0.5, 0.5], 8)
    even = st.predict("tp", stages, hosts, speeds, 1e8, 8, 8192, 0, links, [0.5, 0.5])
    lopsided = st.predict("tp", stages, hosts, speeds, 1e8, 8, 8192, 0, links, [0.9, 0.1])
    assert even == pytest.approx(0.05 + 16e-3 + 1e-3)  # each reads half at 1 GB/s, 16 sums, half a trip
    assert lopsided == pytest.approx(0.09 + 16e-3 + 1e-3)  # the step waits for the rank with 0.9
    pp = st.predict("pp", stages, hosts, speeds, 1e8, 8, 8192, 0, links, [0.5, 0.5])
    assert pp == pytest.approx(0.1 + 1e-3 + 8192 / 1e8 + 1e-3)  # both halves in turn, two hops


def test_pp_needs_the_drivers_host_to_hold_work():
    from types import SimpleNamespace

    from cmatrix.llm.pipeline import decide

    ranks = [SimpleNamespace(host=h) for h in ("a", "a", "b")]
    model = SimpleNamespace(cluster=SimpleNamespace(ranks=ranks), config=SimpleNamespace(num_layers=4))
    model.weights = [0.0, 0.0, 1.0]  # the driver's host, a, holds nothing
    with pytest.raises(InputError, match="driver's host \\(a\\) runs the last stage"):
        decide(model, "pp")
    model.weights = [0.5, 0.0, 0.5]  # rank 1, with no share, is in no stage
    stages, note = decide(model, "pp")
    assert [s.ranks for s in stages] == [(2,), (0,)] and note.startswith("pipeline stages (parallel='pp')")
    model.weights = [1.0, 0.0, 0.0]  # one rank holds everything: tensor-parallel, said so
    assert decide(model, "pp")[0] is None
