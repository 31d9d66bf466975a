"""A rank fails inside a node op (CMATRIX_FAULT, one spec per op, comma-separated); the
driver gets a RankError naming that rank, op and phase, and the cluster stays usable.

Run: CMATRIX_FAULT=nodeop:compute:1,attention:store:1 mpiexec -n 2 python -m cmatrix run node_ops_fault.py
"""

import sys

import numpy as np

import cmatrix as cm

cl = cm.init()
x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
calls = {
    "nodeop": lambda: cl.softmax(cl.shard(x, axis=1), axis=1),  # softmax across ranks
    "attention": lambda: cl.attention(x, x[:, :8], x[:, :8], 8, causal=True),
}
for op, call in calls.items():
    try:
        call()
    except cm.RankError as err:
        assert err.ranks == [1], err.ranks
        assert err.failures[0].op == op, err.failures[0]
        print("CAUGHT", err.failures[0].headline())
    else:
        sys.exit(f"{op}: no error was raised")
# Faults fire once: the same calls now succeed, so every rank is still in step.
e = np.exp(x - x.max(axis=1, keepdims=True))
np.testing.assert_allclose(calls["nodeop"](), e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
assert calls["attention"]().shape == (4, 16)
print("RECOVERED")
