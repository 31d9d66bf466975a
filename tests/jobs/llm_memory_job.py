"""Rank 1 runs in a memory cgroup the test made (CMATRIX_TEST_CGROUP): loading a model whose
equal split does not fit there is refused before any weight moves, naming rank 1; the
shares the refusal suggests load, and the model generates.

    mpiexec -n 2 python tests/jobs/llm_memory_job.py MODEL_DIR
"""

import os
import sys

import numpy  # noqa: F401 - loaded before the move: the cgroup limits what the rank adds

rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
if rank == "1":
    with open(os.path.join(os.environ["CMATRIX_TEST_CGROUP"], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))

import cmatrix as cm  # noqa: E402

cl = cm.init()
before = cl.stats()["bytes_moved"]
try:
    cm.llm.load(cl, sys.argv[1], weights=[0.5, 0.5])
    print("LOADED WITH EQUAL SHARES")
    sys.exit(1)
except cm.InputError as exc:
    text = str(exc)
    print("REFUSED:", text, flush=True)
assert cl.stats()["bytes_moved"] == before, "a refused load moved data"
shares = [float(x) for x in text.split("--weights ")[1].split()[0].split(",")]
model = cm.llm.load(cl, sys.argv[1], weights=shares)
result = model.generate(token_ids=[1, 2, 3], max_new_tokens=4)
print("LOADED", shares, "generated", len(result.token_ids), flush=True)
