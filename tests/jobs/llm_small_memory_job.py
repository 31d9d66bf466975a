"""Both ranks run in memory cgroups the test made (CMATRIX_TEST_CGROUPS: rank 0's and rank
1's, comma-separated) whose limits add up to less than the model's float32 size: as q4_0 it
loads with equal shares and generates, its blocks kept as they are on numpy ranks.

    mpiexec -n 2 python tests/jobs/llm_small_memory_job.py MODEL_DIR
"""

import os
import sys

import numpy  # noqa: F401 - loaded before the move: the cgroup limits what the rank adds

rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
with open(os.path.join(os.environ["CMATRIX_TEST_CGROUPS"].split(",")[int(rank)], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))

import cmatrix as cm  # noqa: E402

cl = cm.init(weights=[0.5, 0.5], backends="numpy")
model = cm.llm.load(cl, sys.argv[1], quant="q4_0")
result = model.generate(token_ids=[1, 2, 3], max_new_tokens=4, stop_token_ids=[])
print("LOADED q4_0, generated", len(result.token_ids), "decoders", model.decoders, flush=True)
