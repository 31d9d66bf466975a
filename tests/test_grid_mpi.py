"""Grid mode on real mpiexec jobs with 1-4 ranks (oversubscribed, one thread each)."""

import json
import re

import pytest
from backend_cases import MIXED, need
from conftest import JOBS, mpirun

pytestmark = pytest.mark.mpi

JOB = JOBS / "grid_job.py"


def _args(weights, grid, backends=None):
    return [json.dumps(weights), json.dumps(grid), json.dumps(backends)]


@pytest.mark.parametrize("n, weights, grid", [
    (1, None, None),
    (2, [0.7, 0.3], None),                  # 1 x 2
    (3, [0.0, 0.25, 0.75], None),           # 1 x 3, a zero share
    (4, None, [2, 2]),
    (4, [0.5, 0.3, 0.2, 0.0], [1, 4]),      # uneven, a zero share
    (4, [0.4, 0.3, 0.2, 0.1], None),        # default 2 x 2, shares not of product form
])
def test_grid_results_match_numpy(n, weights, grid):
    r = mpirun(n, JOB, *_args(weights, grid), timeout=180)
    assert r.returncode == 0, r
    assert re.search(rf"^grid: \d+ checks, 0 failures on {n} ranks$", r.stdout, re.M), r
    assert "FAILED" not in r.stdout, r


def test_grid_with_four_backends_in_one_cluster():
    names = MIXED
    need(*names)
    r = mpirun(4, JOB, *_args([0.4, 0.3, 0.2, 0.1], [2, 2], names), timeout=240)
    assert r.returncode == 0, r
    assert re.search(r"^grid: \d+ checks, 0 failures on 4 ranks$", r.stdout, re.M), r
    for name in names:
        assert f" {name} " in r.stdout, r  # the rank table names every backend


def test_grid_rank_failures_reach_the_driver_and_the_cluster_recovers():
    spec = "grid_matmul:compute:3,grid_matmul:narrow:2,grid_elementwise:prepare:1"
    r = mpirun(4, JOB, *_args(None, [2, 2]), "faults", env={"CMATRIX_FAULT": spec}, timeout=180)
    assert r.returncode == 0, r
    for rank, where in ((3, "grid_matmul/compute"), (2, "grid_matmul/narrow"),
                        (1, "grid_elementwise/prepare")):
        assert f"CAUGHT rank {rank} on host" in r.stdout and where in r.stdout, r
    assert re.search(r"^grid: \d+ checks, 0 failures on 4 ranks$", r.stdout, re.M), r
