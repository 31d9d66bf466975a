"""The weight cache across real mpiexec jobs: save in one job, load in the next,
every stale case, and jobs killed in the middle of a write."""

import json
import sys

import pytest
from conftest import JOBS, mpirun

from cmatrix.io import shardfiles as cache

pytestmark = pytest.mark.mpi


def env_for(tmp_path, **extra):
    return {"CMATRIX_CACHE_DIR": str(tmp_path / "cache"), "CMATRIX_SHM_DIR": str(tmp_path / "shm"), **extra}


@pytest.mark.parametrize("n, weights", [(1, [1.0]), (2, [0.7, 0.3]), (3, [0.2, 0.5, 0.3])])
def test_save_then_load_in_a_new_job_sends_no_weights(tmp_path, n, weights):
    env = env_for(tmp_path)
    args = (json.dumps(weights), str(tmp_path))
    r = mpirun(n, JOBS / "cache_job.py", "save", *args, env=env)
    assert r.returncode == 0 and "SAVE-OK" in r.stdout, r
    r = mpirun(n, JOBS / "cache_job.py", "load", *args, env=env)
    assert r.returncode == 0 and "LOAD-OK" in r.stdout, r
    if n > 1:
        r = mpirun(n, JOBS / "cache_job.py", "stale", *args, env=env)
        assert r.returncode == 0, r
        for case in ("changed-weight", "changed-plan", "corrupted", "truncated", "missing",
                     "auto-resends-stale-rank", "free-disk"):
            assert f"STALE-OK {case}" in r.stdout, r


def test_a_rank_killed_while_saving_leaves_no_partial_cache_file(tmp_path):
    env = env_for(tmp_path)
    args = (json.dumps([0.5, 0.5]), str(tmp_path))
    killed = {**env, "CMATRIX_FAULT": "shard:mid-write:1:exit"}
    r = mpirun(2, JOBS / "cache_job.py", "save", *args, env=killed)
    assert r.returncode != 0, r
    folder = tmp_path / "cache" / "shards" / "t.w1"
    assert not (folder / "rank1.cmshard").exists()
    assert not (folder / "manifest.json").exists()  # the save never completed
    assert list(folder.glob(".rank1.cmshard.*.tmp")), "the kill did not happen mid-write"
    r = mpirun(2, JOBS / "cache_job.py", "load", *args, env=env)
    assert r.returncode != 0 and "CacheError" in r.stderr and "manifest.json does not exist" in r.stderr, r
    r = mpirun(2, JOBS / "cache_job.py", "save", *args, env=env)  # a new save sweeps the orphan
    assert r.returncode == 0, r
    assert not list(folder.glob(".*.tmp"))


SHM_JOB = """
import sys
import numpy as np
import cmatrix as cm
cl = cm.init()
w = np.arange(12 * 8, dtype=np.float32).reshape(12, 8)
x = np.ones((3, 12), np.float32)
print("WROTE", cl.matmul(x, cl.shard(w), out="shm:" + sys.argv[1]))
"""


def test_shm_result_is_readable_from_another_process_and_never_partial(tmp_path):
    job = tmp_path / "shm_job.py"
    job.write_text(SHM_JOB)
    env = env_for(tmp_path)
    r = mpirun(2, job, "y", env=env)
    assert r.returncode == 0, r
    path = tmp_path / "shm" / "y.bin"
    assert f"WROTE {path}" in r.stdout
    check = ("import sys, numpy as np, cmatrix as cm;"
             "t = cm.convert_bin_matrix_to_pt(sys.argv[1]);"
             "w = np.arange(96, dtype=np.float32).reshape(12, 8);"
             "assert np.array_equal(t.numpy(), np.ones((3, 12), np.float32) @ w); print('READ-OK')")
    from conftest import run_cmd

    out = run_cmd([sys.executable, "-c", check, str(path)])
    if "No module named 'torch'" in out.stderr:
        pytest.skip("torch not installed in this environment")
    assert out.returncode == 0 and "READ-OK" in out.stdout, out
    r = mpirun(2, job, "z", env={**env, "CMATRIX_FAULT": "matmul:mid-write:0:exit"})
    assert r.returncode != 0, r
    assert not (tmp_path / "shm" / "z.bin").exists()
    assert list((tmp_path / "shm").glob(".z.bin.*.tmp")), "the kill did not happen mid-write"


def test_cache_dir_is_per_user_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("CMATRIX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "cmatrix"
    monkeypatch.setenv("CMATRIX_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache.shard_path("a.b", 3) == tmp_path / "elsewhere" / "shards" / "a.b" / "rank3.cmshard"


@pytest.mark.parametrize("n", [2, 3])
def test_shared_window_moves_the_same_bytes_as_mpi(n):
    r = mpirun(n, JOBS / "shared_window.py", plain=True, env={"CMATRIX_EVERY_RANK": "1"})
    assert r.returncode == 0 and "SHARED-OK" in r.stdout, r
