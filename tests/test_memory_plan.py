"""The memory plan before a model loads (pure arithmetic): what each rank's share needs, a
refusal that names the rank, and shares that fit."""

from __future__ import annotations

import pytest

from cmatrix.errors import InputError
from cmatrix.llm import memory_plan as mp
from cmatrix.llm.config import DecoderConfig
from cmatrix.llm.layout import matrix_splits

CFG = DecoderConfig(model_type="llama", vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                    num_layers=4, num_heads=8, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                    max_positions=4096, rope_theta=1e4, rope_scaling=None, tie_word_embeddings=False,
                    qkv_bias=False, o_bias=False, mlp_bias=False, windows=(None,) * 4)
MiB = 1 << 20


def rank(r, free, per_value=4.0, host="a", pool="ram", backend="numpy"):
    return mp.RankMemory(r, host, backend, free, pool, per_value)


def test_the_ranks_hold_every_weight_value_once():
    splits = matrix_splits(CFG, None)
    layer = sum(rows * cols for part, ((rows, cols), _, _) in splits.items() if part != "lm_head")
    total = CFG.num_layers * layer + CFG.vocab_size * CFG.hidden_size
    for weights in ([1.0], [0.5, 0.5], [0.7, 0.2, 0.1, 0.0]):
        held = mp.per_rank_values(CFG, weights, None)
        assert sum(held) == total
    held = mp.per_rank_values(CFG, [0.75, 0.25], "q4_0")
    assert sum(held) == total and held[0] > 2.5 * held[1]
    assert mp.per_rank_values(CFG, [1.0, 0.0], None)[1] == 0


def test_a_plan_that_fits_passes_and_one_that_does_not_names_the_rank():
    weights = [0.5, 0.5]
    mp.check(CFG, weights, None, "float32", [rank(0, 20 << 30, pool="ram"), rank(1, 20 << 30, host="b")])
    with pytest.raises(InputError) as info:
        mp.check(CFG, weights, None, "float32", [rank(0, 20 << 30), rank(1, 100 * MiB, host="b")])
    text = str(info.value)
    assert "host b (ram): rank 1 (numpy)" in text and "100.0 MiB free" in text
    assert "host a" not in text  # rank 0 fits
    assert "Shares that fit: --weights " in text and "CMATRIX_MEMORY_CHECK=0" in text
    shares = [float(x) for x in text.split("--weights ")[1].split()[0].split(",")]
    assert abs(sum(shares) - 1) < 1e-9 and shares[1] < 0.5
    mp.check(CFG, shares, None, "float32", [rank(0, 20 << 30), rank(1, 100 * MiB, host="b")])


def test_ranks_in_one_pool_share_its_memory():
    free = 500 * MiB  # enough for either rank alone (about 330 MiB as float32), not for both
    mp.check(CFG, [0.5, 0.5], None, "float32", [rank(0, free), rank(1, free, host="b")])
    with pytest.raises(InputError, match=r"host a \(ram\): rank 0 \(numpy\) .*, rank 1"):
        mp.check(CFG, [0.5, 0.5], None, "float32", [rank(0, free), rank(1, free)])


def test_a_pool_is_split_by_what_its_ranks_store_not_equally():
    """Rank 0 (the driver, no share) and rank 1 share host a's memory: rank 1 may use what the
    driver leaves, so the suggestion stays near the asked 0.6 (an equal split of the host
    capped rank 1 at 0.224)."""
    ranks = [rank(0, 450 * MiB), rank(1, 450 * MiB), rank(2, 450 * MiB, host="b")]
    with pytest.raises(InputError) as info:
        mp.check(CFG, [0.0, 0.6, 0.4], None, "float32", ranks)
    shares = [float(x) for x in str(info.value).split("--weights ")[1].split()[0].split(",")]
    assert shares[0] == 0.0 and 0.4 < shares[1] < 0.6
    mp.check(CFG, shares, None, "float32", ranks)


def test_no_shares_fit_says_how_to_store_fewer_bytes_and_unknown_memory_is_not_checked():
    small = [rank(0, 150 * MiB), rank(1, 150 * MiB, host="b")]
    with pytest.raises(InputError, match="Found no shares that fit.*q4_0"):
        mp.check(CFG, [0.5, 0.5], None, "float32", small)
    mp.check(CFG, [0.5, 0.5], None, "float32", [rank(0, None), rank(1, None, host="b")])


def test_the_check_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("CMATRIX_MEMORY_CHECK", "0")
    mp.check(CFG, [0.5, 0.5], None, "float32", [rank(0, 1), rank(1, 1, host="b")])


def test_suggested_shares_keep_a_zero_share_at_zero_and_sum_to_one():
    reports = [rank(0, 20 << 30), rank(1, 20 << 30, host="b"), rank(2, 200 * MiB, host="c")]
    with pytest.raises(InputError) as info:
        mp.check(CFG, [0.0, 0.5, 0.5], None, "float32", reports)
    shares = [float(x) for x in str(info.value).split("--weights ")[1].split()[0].split(",")]
    assert shares[0] == 0.0 and abs(sum(shares) - 1) < 1e-9 and shares[2] < 0.5
    mp.check(CFG, shares, None, "float32", reports)


def test_page_cache_in_a_cgroup_is_not_counted_as_used(tmp_path, monkeypatch):
    from cmatrix.backends import hostmem

    group = tmp_path / "memory" / "job"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(str(1000 * MiB))
    (group / "memory.usage_in_bytes").write_text(str(900 * MiB))
    (group / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {600 * MiB}\n")
    monkeypatch.setattr(hostmem, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(hostmem, "_cgroups", lambda: [(group / "memory.limit_in_bytes",
                                                       group / "memory.usage_in_bytes", "/job")])
    free, pool = hostmem.available()
    assert pool == "cgroup /job" and free == 700 * MiB


def test_a_stage_layout_is_checked_for_what_each_rank_holds_in_stages():
    from cmatrix.llm import stages as st

    weights = [0.9, 0.1]
    values = mp.per_rank_values(CFG, weights, None)[1]
    fixed = mp.fixed_bytes(CFG, weights, None, mp.CONTEXT)[1]
    ranks = [rank(0, 20 << 30), rank(1, int(1.1 * mp.MARGIN * (4 * values + fixed)), host="b")]
    mp.check(CFG, weights, None, "float32", ranks)  # tensor-parallel: rank 1 holds 0.1 of every layer
    stages = st.plan(["a", "b"], weights, CFG.num_layers)  # but a stage holds at least one whole layer
    held = st.stage_fractions(stages, weights, CFG.num_layers)
    assert held[1] == pytest.approx(0.25)
    with pytest.raises(InputError, match="rank 1"):
        mp.check(CFG, held, None, "float32", ranks)
