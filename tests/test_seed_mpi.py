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
def test_seed_api_matches_torch(backends, shares, plain):
    need("torch", *backends)
    n = len(backends)
    r = mpirun(n, JOBS / "seed_api_job.py", json.dumps(backends), json.dumps(shares), plain=plain,
               timeout=240)
    assert r.returncode == 0, r
    assert f"0 failures on {n} ranks" in r.stdout, r
