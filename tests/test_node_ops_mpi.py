"""Node-side operations (activations, softmax, RMSNorm, rope, repeat_kv, attention) on
real mpiexec jobs: every layout, shares with a zero, mixed backends."""

import json

import pytest
from backend_cases import need
from conftest import JOBS, mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n, weights", [
    (1, None),
    (2, [0.7, 0.3]),
    (3, [0.0, 0.5, 0.5]),  # the driver holds nothing
])
def test_node_ops_match_numpy(n, weights):
    args = [json.dumps(weights)] if weights else []
    r = mpirun(n, JOBS / "node_ops_job.py", *args, timeout=240)
    assert r.returncode == 0, r
    assert f"0 failures on {n} ranks" in r.stdout, r


def test_node_ops_on_four_backends():
    names = ["torch", "numpy", "ggml", "opencl"]
    need(*names)
    r = mpirun(4, JOBS / "node_ops_job.py", json.dumps([0.4, 0.3, 0.2, 0.1]), json.dumps(names), timeout=300)
    assert r.returncode == 0, r
    assert "0 failures on 4 ranks" in r.stdout, r


@pytest.mark.parametrize("faults", [
    "nodeop:compute:1,attention:store:1",
    "nodeop:store:1,attention:compute:1",
])
def test_a_failing_rank_reaches_the_driver_and_the_cluster_recovers(faults):
    r = mpirun(2, JOBS / "node_ops_fault.py", env={"CMATRIX_FAULT": faults}, timeout=120)
    assert r.returncode == 0, r
    assert r.stdout.count("CAUGHT") == 2 and "RECOVERED" in r.stdout, r
