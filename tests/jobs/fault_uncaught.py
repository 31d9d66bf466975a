"""A worker error the job does not catch: the job must end non-zero, quickly."""

import numpy as np

import cmatrix as cm

cl = cm.init()
W = cl.shard(np.ones((8, 8), np.float32))
cl.matmul(np.ones((2, 8), np.float32), W)
print("UNREACHABLE")
