"""cm.nn.shard_linears on random transformers models (BERT-, GPT-2- and Llama-style) on real
mpiexec jobs: uneven shares with a zero, mixed backends."""

import json

import pytest
from backend_cases import need
from conftest import JOBS, mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n, weights, names", [
    (2, [0.7, 0.3], None),
    (3, [0.0, 0.5, 0.5], None),  # the driver holds no weight rows
    (4, [0.4, 0.3, 0.2, 0.1], ["torch", "numpy", "ggml", "opencl"]),
])
def test_shard_linears_gives_the_unmodified_outputs(n, weights, names):
    pytest.importorskip("transformers")
    need("torch", *(names or ()))
    args = [json.dumps(weights)] + ([json.dumps(names)] if names else [])
    r = mpirun(n, JOBS / "nn_job.py", *args, timeout=240)
    assert r.returncode == 0, r
    assert f"nn: 3 models, 0 failures on {n} ranks" in r.stdout, r
