"""Shares from measured speed on real mpiexec jobs: ``cmatrix bench`` and its saved profiles,
``weights="auto"`` with one rank held back by a CPU quota, rebalancing when a rank slows
down mid-generation, and a rank with no share staying out of the decode steps."""

import sys

import pytest
from backend_cases import need
from conftest import JOBS, job_env, run_cmd
from slow_rank import CpuQuota

from cmatrix.engine import launch

pytestmark = pytest.mark.mpi


def _tiny(tmp_path):
    for m in ("transformers", "tokenizers"):
        pytest.importorskip(m)
    sys.path.insert(0, str(JOBS.parent.parent / "jobs"))
    from tiny_llama import build

    # large enough that a step's arithmetic (a few ms) outweighs the noise of a shared machine
    return build(tmp_path / "model", vocab_size=2048, hidden_size=512, intermediate_size=1408,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, scale=4.0,
                 tokenizer=False)


def test_bench_saves_each_hosts_profile_and_reuses_it(tmp_path):
    need("ggml")
    env = job_env({"CMATRIX_CACHE_DIR": str(tmp_path / "cache")})
    bench = [sys.executable, "-m", "cmatrix", "bench", "--backends", "numpy,ggml", "--seconds", "0.01"]
    first = run_cmd(launch.command(2, bench), env, timeout=180)
    assert first.returncode == 0, first
    assert "decode GB/s" in first.stdout and "prefill GFLOP/s" in first.stdout, first
    assert first.stdout.count(" measured (") == 2, first
    assert "LLM decoding" in first.stdout and "--weights " in first.stdout, first
    profiles = sorted((tmp_path / "cache" / "profiles").glob("*.json"))
    # one per device slot: rank 0 (local rank 0) on numpy, rank 1 on ggml
    assert sorted(("-ggml-" in p.name, p.name.endswith("-l1.json")) for p in profiles) == \
        [(False, False), (True, True)], profiles
    again = run_cmd(launch.command(2, bench), env, timeout=180)
    assert again.returncode == 0 and again.stdout.count(" reused (") == 2, again
    fresh = run_cmd(launch.command(2, [*bench, "--remeasure"]), env, timeout=180)
    assert fresh.returncode == 0 and fresh.stdout.count(" measured (") == 2, fresh


def test_a_broken_profile_is_measured_again(tmp_path):
    env = job_env({"CMATRIX_CACHE_DIR": str(tmp_path / "cache")})
    bench = [sys.executable, "-m", "cmatrix", "bench", "--seconds", "0.01"]
    assert run_cmd(bench, env, timeout=120).returncode == 0
    (profile,) = (tmp_path / "cache" / "profiles").glob("*.json")
    profile.write_text('{"version": 1, "decode": {"float32": -3}}')
    r = run_cmd(bench, env, timeout=120)
    assert r.returncode == 0 and " measured (" in r.stdout, r


def _slowed(job: list[str], quota: CpuQuota) -> list[str]:
    """Rank 0 as usual, rank 1 inside the CPU cgroup."""
    return launch.command(1, job) + [":", "-n", "1", *quota.enter(job)]


def test_auto_shares_move_work_away_from_a_rank_held_to_a_fifth_of_a_core(tmp_path):
    env = job_env({"CMATRIX_CACHE_DIR": str(tmp_path / "cache")})
    with CpuQuota() as quota:
        quota.limit(0.2)
        r = run_cmd(_slowed([sys.executable, str(JOBS / "balance_job.py"), "init"], quota), env, timeout=240)
    assert r.returncode == 0, r
    assert "balance-init: 3 checks, 0 failures on 2 ranks" in r.stdout, r


def test_rebalancing_follows_a_rank_that_slows_down_mid_generation(tmp_path):
    path = _tiny(tmp_path)
    with CpuQuota() as quota:
        quota.limit(None)
        slow = "20000" if quota.v1 else "20000 100000"  # a fifth of a core, from the 8th token on
        job = [sys.executable, str(JOBS / "balance_job.py"), "rebalance", str(path), str(quota.limit_file),
               slow]
        r = run_cmd(_slowed(job, quota), job_env(), timeout=300)
    assert r.returncode == 0, r
    assert "balance-rebalance: 4 checks, 0 failures on 2 ranks" in r.stdout, r
    assert "rebalanced after" in r.stdout, r


@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_a_replan_moves_the_kv_cache_with_the_heads(kind, tmp_path):
    path = _tiny(tmp_path)
    if kind == "gguf":  # a GGUF file is closed after loading: a re-plan opens it again
        pytest.importorskip("gguf")
        from gguf_export import export

        path = export(path, tmp_path / "model.gguf", "f32")
    job = [sys.executable, str(JOBS / "balance_job.py"), "replan", str(path)]
    r = run_cmd(launch.command(2, job), job_env(), timeout=240)
    assert r.returncode == 0, r
    assert "balance-replan: 4 checks, 0 failures on 2 ranks" in r.stdout, r


def test_a_failed_replan_closes_the_model_and_it_loads_again(tmp_path):
    path = _tiny(tmp_path)
    job = [sys.executable, str(JOBS / "balance_job.py"), "replan-fault", str(path)]
    r = run_cmd(launch.command(2, job), job_env({"CMATRIX_FAULT": "llm_kv_scatter:import:1"}), timeout=240)
    assert r.returncode == 0, r
    assert "balance-replan-fault: 4 checks, 0 failures on 2 ranks" in r.stdout, r
    assert "re-planning the model across the ranks failed, so it was closed" in r.stderr, r


def test_a_rank_with_no_share_stays_out_of_the_decode_steps(tmp_path):
    path = _tiny(tmp_path)
    job = [sys.executable, str(JOBS / "balance_job.py"), "zero", str(path)]
    r = run_cmd(launch.command(2, job), job_env(), timeout=240)
    assert r.returncode == 0, r
    assert "balance-zero: 4 checks, 0 failures on 2 ranks" in r.stdout, r
