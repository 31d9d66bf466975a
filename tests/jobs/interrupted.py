"""Waits for Ctrl-C on the driver, then shows the cluster still works (cmatrix launch hands
the terminal's Ctrl-C to rank 0 alone, under MPICH and Open MPI alike)."""

import time

import numpy as np

import cmatrix as cm

cl = cm.init()
print("READY", flush=True)
try:
    time.sleep(100)
    print("NO INTERRUPT", flush=True)
except KeyboardInterrupt:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = cl.matmul(np.ones((1, 3), np.float32), cl.shard(w))
    print("CAUGHT, then", y.tolist(), flush=True)
