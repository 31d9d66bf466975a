"""cmatrix across hosts: a cluster of network namespaces (jobs/netcluster.py), each with its own
name, address and home folder, joined by a switch; MPICH reaches them through a stand-in for
ssh and talks TCP over their interfaces (checked with the interfaces' byte counters).

Needs root and ``ip netns`` (as on CI here) and MPICH; skipped elsewhere with the reason.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cmatrix.engine import launch

ROOT = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).resolve().parent / "jobs"
sys.path.insert(0, str(ROOT / "jobs"))
import netcluster  # noqa: E402

REASON = netcluster.skip_reason() or (None if launch.implementation() == "mpich" else
                                      "the namespace cluster starts ranks through MPICH's hydra")
pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(bool(REASON), reason=f"no namespace cluster here: {REASON}")]


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


def test_on_a_wifi_like_link_auto_runs_in_stages(tmp_path, llm_model):
    """100 Mbit/s with 2 ms each way (a userspace relay: no netem here): auto measures the link,
    picks pipeline stages for this small model, and says why; the tokens are one host's."""
    if REASON:
        pytest.skip(f"no namespace cluster here: {REASON}")
    job = str(JOBS / "multihost_job.py")
    with netcluster.NetCluster(hosts=2, link="wifi", folder=tmp_path / "wifi") as wifi:
        alone = tagged(on_hosts(wifi, {"h1": 1}, job, "llm", str(llm_model), "tp").stdout, "TOKENS")
        r = on_hosts(wifi, {"h1": 1, "h2": 1}, job, "llm", str(llm_model), "auto")
    note = tagged(r.stdout, "LAYOUT")["note"]
    assert note.startswith("pipeline stages (parallel='auto'): stage 1: rank 1 on h2"), note
    allreduce_ms = float(note.rpartition("an Allreduce takes ")[2].split(" ms")[0])
    assert allreduce_ms >= 2.0, note  # the link's delay is there to be measured
    assert tagged(r.stdout, "TOKENS") == alone


def test_a_stage_rank_left_no_rows_still_joins_its_stage(net, llm_model):
    """Rank 2's small share rounds to no KV group and no MLP rows of h2's stage: it still takes
    part in the stage's collectives (no hang), and the tokens are one host's."""
    job = str(JOBS / "multihost_job.py")
    alone = tagged(on_hosts(net, {"h1": 1}, job, "llm", str(llm_model), "tp").stdout, "TOKENS")
    r = on_hosts(net, {"h1": 1, "h2": 2}, job, "llm", str(llm_model), "pp", "[0.5, 0.45, 0.05]", timeout=120)
    layout = tagged(r.stdout, "LAYOUT")["layout"]
    assert layout[2]["kv_groups"] == 0 and layout[2]["mlp_rows"] == 0, layout
    assert tagged(r.stdout, "TOKENS") == alone


# ---- cmatrix launch across hosts whose home folders lie at different paths ---------------------

@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    """Hosts whose HOME paths differ (as /home/you beside /Users/you): a rank that took the
    driver's HOME would write into the driver's home folder."""
    if REASON:
        pytest.skip(f"no namespace cluster here: {REASON}")
    with netcluster.NetCluster(hosts=3, folder=tmp_path_factory.mktemp("homes") / "cluster",
                               own_homes=True) as cluster:
        yield cluster


def launch_on(net, lines: list[str], *args: str, timeout: float = 180):
    hostfile = net.folder / f"launch-{abs(hash(tuple(lines)))}.hosts"
    hostfile.write_text("".join(line + "\n" for line in lines))
    argv = [sys.executable, "-m", "cmatrix", "launch", "--hostfile", str(hostfile), *args]
    return net.run(argv, timeout=timeout, capture_output=True, text=True)


def test_launch_checks_the_hosts_then_runs_doctor_on_each(homes):
    r = launch_on(homes, ["h1", "h2:2 CMATRIX_THREADS=2", "h3"], "doctor")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "checked 2 other host(s) through the launcher" in r.stderr, r.stderr
    for host in ("h1", "h2", "h3"):
        assert host in r.stdout, r.stdout


def test_launch_settings_and_defaults_are_each_hosts_own(homes):
    lines = ["h1", "h2 CMATRIX_THREADS=3", "h3"]
    r = launch_on(homes, lines, str(JOBS / "multihost_job.py"), "ranks")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert [(x["host"], x["threads"]) for x in tagged(r.stdout, "RANKS")] == [("h1", 1), ("h2", 3), ("h3", 1)]
    r = launch_on(homes, lines, str(JOBS / "cache_where.py"))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    for k, host in enumerate(homes.names):
        found = sorted(p.name for p in homes.home(host).rglob("*.cmshard"))
        assert found == [f"rank{k}.cmshard"], (host, found)


def test_every_listening_socket_is_in_the_firewalls_range(homes):
    import shutil
    import time

    if not shutil.which("ss"):
        pytest.skip("no ss here to list sockets")
    hostfile = homes.folder / "hold.hosts"
    hostfile.write_text("h1\nh2\nh3\n")
    argv = [sys.executable, "-m", "cmatrix", "launch", "--hostfile", str(hostfile), "--ports", "51000-51099",
            str(JOBS / "multihost_job.py"), "hold", "8"]
    proc = homes.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "HOLDING" in proc.stdout.readline() or "HOLDING" in proc.stdout.readline()
        time.sleep(0.5)
        for host in homes.names:
            listing = homes.run(["ss", "-ltnH"], host=host, capture_output=True, text=True).stdout
            ports = [int(ln.split()[3].rpartition(":")[2]) for ln in listing.splitlines() if ln.strip()]
            assert ports and all(51000 <= p <= 51099 for p in ports), (host, listing)
    finally:  # the job ends by itself a few seconds later
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_plain_mpiexec_hands_every_host_the_drivers_home(homes):
    """Why cmatrix launch passes only what ranks need: hydra copies the driver's HOME to every
    rank, so a plain mpiexec puts every host's cache in the driver's home folder."""
    hostfile = homes.hostfile(homes.folder / "plain.hosts")
    argv = [launch.mpiexec(), "-f", str(hostfile), "-n", "3", sys.executable, str(JOBS / "env_report.py"),
            "HOME"]
    r = homes.run(argv, timeout=120, capture_output=True, text=True)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    homes_seen = {json.loads(ln[4:])["HOME"] for ln in r.stdout.splitlines() if ln.startswith("ENV ")}
    assert homes_seen == {str(homes.home("h1"))}, homes_seen


def test_launch_names_every_host_it_cannot_use_before_starting(homes):
    absent = homes.addresses[0].rsplit(".", 1)[0] + ".9"  # on the network, but no host answers
    r = launch_on(homes, ["h1", "h2", absent, "nowhere.invalid"], str(JOBS / "multihost_job.py"), "ranks",
                  timeout=90)
    assert r.returncode == 2, f"{r.stdout}\n{r.stderr}"
    assert "RANKS" not in r.stdout, r.stdout  # nothing started
    problems = [ln.strip() for ln in r.stderr.splitlines()]

    def named(host: str, text: str) -> bool:
        return any(ln.startswith(f"{host}:") and text in ln for ln in problems)
    assert named(absent, "ssh-copy-id"), r.stderr
    assert named("nowhere.invalid", "/etc/hosts"), r.stderr
    assert named("h2", "nowhere.invalid does not resolve"), r.stderr
