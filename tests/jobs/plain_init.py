"""A plain script: every rank runs it; cm.init() keeps only the driver going."""

import numpy as np

import cmatrix as cm

cl = cm.init(weights=None)
print(f"DRIVER-ONLY size={cl.size}", flush=True)
w = np.arange(12, dtype=np.float32).reshape(3, 4)
y = cl.matmul(np.ones((1, 3), np.float32), cl.shard(w))
assert np.array_equal(y, w.sum(axis=0, keepdims=True)), y
print("PLAIN-OK", flush=True)
