"""On several ranks, bad input is refused on the driver before anything moves,
and the cluster stays usable."""

import numpy as np

import cmatrix as cm

cl = cm.init()
w = np.ones((6, 4), np.float32)
W = cl.shard(w)
cases = [
    ("weights", lambda: cl.shard(w, weights=[1.0])),
    ("weights", lambda: cl.shard(w, weights=[0.6] + [0.1] * (cl.size - 1))),
    ("inner dimensions", lambda: cl.matmul(np.ones((2, 5), np.float32), W)),
    ("unsupported dtype", lambda: cl.matmul(np.ones((2, 6)), W)),
    ("file not found", lambda: cl.shard("/nonexistent/w.npy")),
    ("unknown backend", lambda: cm.init(backends="tpu")),
    ("sharded alike", lambda: cl.add(W, cl.shard(w, axis=0))),
]
for fragment, call in cases:
    before = cl.stats()
    try:
        call()
    except cm.InputError as err:
        assert fragment in str(err), (fragment, str(err))
    else:
        raise AssertionError(f"not refused: {fragment}")
    if fragment != "sharded alike":  # that one legitimately sharded its second operand first
        assert cl.stats() == before, (fragment, before, cl.stats())
y = cl.matmul(np.ones((2, 6), np.float32), W)
assert np.array_equal(y, np.full((2, 4), 6, np.float32))
print("VALIDATION-OK")
