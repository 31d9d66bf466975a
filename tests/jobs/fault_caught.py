"""A rank fails mid-operation (CMATRIX_FAULT); the driver gets a RankError naming
it, and the cluster keeps working afterwards."""

import socket
import sys

import numpy as np

import cmatrix as cm

op, phase, bad_rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
cl = cm.init()
rng = np.random.default_rng(0)
a = rng.standard_normal((6, 10)).astype(np.float32)
w = rng.standard_normal((10, 9)).astype(np.float32)
try:
    W = cl.shard(w)
    cl.matmul(a, W)
except cm.RankError as err:
    text = str(err)
    assert err.ranks == [bad_rank], err.ranks
    failure = err.failures[0]
    assert failure.host == socket.gethostname() or failure.host, failure
    assert failure.backend == "numpy" and failure.op == op and failure.phase == phase, failure
    for needed in (f"rank {bad_rank}", "backend numpy", "InjectedFault", "Traceback", "faults.py"):
        assert needed in text, (needed, text)
    print("CAUGHT", failure.headline())
else:
    sys.exit("no error was raised")
# The cluster is still in step: a fresh shard and product are correct.
W2 = cl.shard(w, axis=0)
np.testing.assert_allclose(cl.matmul(a, W2), a @ w, rtol=1e-4, atol=1e-4)
print("RECOVERED")
