"""Every rank runs this (plain mpiexec, CMATRIX_EVERY_RANK=1): bcast_shared and gather_shared
against the MPI calls."""

import numpy as np

from cmatrix.core.plan import Plan
from cmatrix.engine.comm import Comm

comm = Comm()
rng = np.random.default_rng(3)
ok = True
for shape in ((7, 5), (300, 1000), (1, 9)):
    src = rng.standard_normal(shape).astype(np.float32)  # the same on every rank (same seed)
    view = comm.bcast_shared(src if comm.is_driver else None, shape=shape, dtype=np.float32)
    ok &= bool(np.array_equal(view, src)) and not view.flags.writeable
    for axis, weights in ((1, [0.5, 0.2, 0.3][: comm.size]), (0, [0.0, 0.6, 0.4][: comm.size])):
        weights = np.array(weights) / sum(weights)
        plan = Plan.from_weights(shape[axis], weights, axis)
        mine = plan.block(comm.rank)
        block = np.ascontiguousarray(src[mine] if axis == 0 else src[:, mine])
        full = np.zeros(shape, np.float32) if comm.is_driver else None
        comm.gather_shared(block, full, plan)
        if comm.is_driver:
            ok &= bool(np.array_equal(full, src))
failed = comm.any_failed(not ok)
comm.free_shared()
if comm.is_driver:
    print("SHARED-OK" if not failed else "SHARED-MISMATCH")
