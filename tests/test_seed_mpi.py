"""The seed API on real mpiexec jobs (tests/jobs/seed_api_job.py): grid mode, inner-split
weights, node ops through cluster_matrix, and the cluster lists' errors on several ranks."""

import json

import pytest
from backend_cases import need
from conftest import JOBS, mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("backends, shares, plain", [
    (["numpy"], [1.0], True),
    (["numpy", "torch"], [0.6, 0.4], False),
    (["numpy", "numpy", "numpy"], [0.0, 0.5, 0.5], True),   # the driver holds nothing
    (["llama", "torch", "opencl", "llama"], [0.35, 0.35, 0.15, 0.15], True),
])
def test_seed_api_matches_torch(backends, shares, plain, tmp_path):
    need("torch", *backends)
    n = len(backends)
    r = mpirun(n, JOBS / "seed_api_job.py", json.dumps(backends), json.dumps(shares), plain=plain,
               env={"CMATRIX_CACHE_DIR": str(tmp_path / "cache")}, timeout=240)
    assert r.returncode == 0, r
    assert f"0 failures on {n} ranks" in r.stdout, r


@pytest.mark.parametrize("n", [1, 2, 4])
def test_seed_scripts_in_the_cluster_zmq_form(n, tmp_path):
    """The seed's own test scripts as written (cluster_zmq, cluster_matrix_v1, a prologue that
    writes files), only IPs and paths changed, under plain mpirun on 1, 2 and 4 ranks."""
    need("torch", "ggml")
    env = {"CMATRIX_CACHE_DIR": str(tmp_path / "cache")}
    r = mpirun(n, JOBS / "seed_zmq_scripts.py", str(tmp_path), env=env, plain=True, timeout=240)
    assert r.returncode == 0, r
    checks = 13 if n == 1 else 12
    assert f"seed-zmq: {checks} checks, 0 failures on {n} ranks" in r.stdout, r


def test_loadc_in_a_later_job_reads_the_nodes_disks(tmp_path):
    need("torch", "ggml")
    env = {"CMATRIX_CACHE_DIR": str(tmp_path / "cache")}
    for mode in ("saveC", "loadC"):
        r = mpirun(2, JOBS / "seed_loadc.py", mode, env=env, plain=True, timeout=120)
        assert r.returncode == 0, r
        assert f"loadc: {mode} ok on 2 ranks" in r.stdout, r
    assert list((tmp_path / "cache").rglob("rank1.cmshard")), "saveC wrote nothing to the nodes' disks"
