"""cmatrix across hosts: a cluster of network namespaces (jobs/netcluster.py), each with its own
name, address and home folder, joined by a switch; MPICH reaches them through a stand-in for
ssh and talks TCP over their interfaces (checked with the interfaces' byte counters).

Needs root and ``ip netns`` (as on CI here) and MPICH; skipped elsewhere with the reason.
"""

import json
import sys
from pathlib import Path

import pytest

from cmatrix.engine import launch

ROOT = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).resolve().parent / "jobs"
sys.path.insert(0, str(ROOT / "jobs"))
import netcluster  # noqa: E402

pytestmark = pytest.mark.mpi
REASON = netcluster.skip_reason() or (None if launch.implementation() == "mpich" else
                                      "the namespace cluster starts ranks through MPICH's hydra")


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    if REASON:
        pytest.skip(f"no namespace cluster here: {REASON}")
    with netcluster.NetCluster(hosts=3, folder=tmp_path_factory.mktemp("net") / "cluster") as cluster:
        yield cluster


def on_hosts(net, slots: dict, *args: str, timeout: float = 180, plain: bool = False):
    """Run ``args`` (a job and its arguments) on ``slots`` ranks per host, from h1."""
    hostfile = net.hostfile(net.folder / f"hosts-{'-'.join(f'{h}{k}' for h, k in slots.items())}", slots)
    runner = [sys.executable] if plain else [sys.executable, "-m", "cmatrix", "run"]
    argv = [launch.mpiexec(), "-f", str(hostfile), "-n", str(sum(slots.values())), *runner, *args]
    r = net.run(argv, timeout=timeout, capture_output=True, text=True)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def tagged(stdout: str, tag: str):
    return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith(tag + " "))[len(tag) + 1:])


def test_ranks_are_on_their_hosts_and_a_repeated_host_binds_device_slots(net):
    before = net.counters()
    r = on_hosts(net, {"h1": 2, "h2": 1, "h3": 1}, str(JOBS / "multihost_job.py"), "ranks")
    ranks = tagged(r.stdout, "RANKS")
    assert [(x["host"], x["local_rank"]) for x in ranks] == [("h1", 0), ("h1", 1), ("h2", 0), ("h3", 0)]
    after = net.counters()
    for host in ("h2", "h3"):  # the job's traffic crossed each host's interface
        assert after[host][1] > before[host][1] + 1000, (host, before, after)


def test_the_demo_job_runs_across_hosts(net):
    r = on_hosts(net, {"h1": 1, "h2": 1, "h3": 1}, str(ROOT / "jobs" / "matmul.py"))
    assert "h2" in r.stdout and "h3" in r.stdout, r.stdout
    wrong = [ln for ln in r.stdout.splitlines() if ln.rstrip().endswith(" no")]
    assert "3 ranks" in r.stdout and not wrong, r.stdout


def test_the_seed_api_takes_the_hosts_addresses(net):
    ips = [net.addresses[0], net.addresses[1], net.addresses[2]]
    r = on_hosts(net, {"h1": 1, "h2": 1, "h3": 1}, str(JOBS / "multihost_job.py"), "seed", json.dumps(ips))
    assert "SEED max error" in r.stdout and "SEED refused" in r.stdout, r.stdout
    assert "10.254.254.254" in r.stdout, r.stdout  # the refusal names the address of no rank


def test_each_host_keeps_its_own_cache(net):
    slots = {"h1": 1, "h2": 1, "h3": 1}
    on_hosts(net, slots, str(JOBS / "multihost_job.py"), "cache", "save")
    for k, host in enumerate(net.names):  # rank k's shard on host k's disk only
        files = {p.name for p in (net.home(host) / ".cache" / "cmatrix" / "shards").rglob("*.cmshard")}
        assert files == {f"rank{k}.cmshard"}, (host, sorted(files))
    r = on_hosts(net, slots, str(JOBS / "multihost_job.py"), "cache", "load")
    assert "CACHE load max error" in r.stdout, r.stdout


@pytest.fixture(scope="module")
def llm_model(tmp_path_factory):
    from tiny_llama import build

    return build(tmp_path_factory.mktemp("mh") / "tiny", vocab_size=128, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 tokenizer=False, scale=4.0)


def test_generation_across_hosts_is_token_identical_to_one_host(net, llm_model):
    job = str(JOBS / "multihost_job.py")
    alone = tagged(on_hosts(net, {"h1": 1}, job, "llm", str(llm_model), "tp").stdout, "TOKENS")
    slots = {"h1": 2, "h2": 1, "h3": 1}
    tp = on_hosts(net, slots, job, "llm", str(llm_model), "tp")
    before = net.counters()
    pp = on_hosts(net, slots, job, "llm", str(llm_model), "pp")
    after = net.counters()
    assert tagged(tp.stdout, "TOKENS") == alone
    assert tagged(pp.stdout, "TOKENS") == alone
    layout = tagged(pp.stdout, "LAYOUT")
    # a stage per host, the driver's host last with its two ranks tensor-parallel
    assert "stage 1: rank 2 on h2" in layout["note"] and "stage 3: ranks 0,1 on h1" in layout["note"], layout
    assert [p["layers"] for p in layout["layout"]] == [[2, 4], [2, 4], [0, 1], [1, 2]], layout
    assert after["h3"][1] > before["h3"][1], (before, after)
    auto = on_hosts(net, slots, job, "llm", str(llm_model), "auto")
    assert tagged(auto.stdout, "TOKENS") == alone
    assert "parallel='auto'" in tagged(auto.stdout, "LAYOUT")["note"], auto.stdout
