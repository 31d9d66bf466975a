"""After shutdown() nothing more can run, and init() says so."""

import numpy as np

import cmatrix as cm

cl = cm.init()
W = cl.shard(np.ones((2, 2), np.float32))
cl.shutdown()
for label, call in (("matmul", lambda: cl.matmul(np.ones((1, 2), np.float32), W)),
                    ("init", cm.init)):
    try:
        call()
    except cm.ClusterClosedError as err:
        print("CLOSED", label, err)
    else:
        raise AssertionError(f"{label} ran after shutdown")
