"""Every command the ranks run, one module per family, each with its driver half (the
public methods the :class:`cmatrix.Cluster` facade is made of) and its rank half side by
side, sharing one typed header. Importing this package registers every rank half.

    setup        configure, probe, identify
    handles      matrix handles; gather (and how results reach the user)
    placement    shard, replicate
    cache        the resident-weight cache: cache_check, cache_list, cache_free
    matmul       op(a) @ op(b) with b sharded
    elementwise  shard-wise add and sub
    nodeops      activations, softmax, RMSNorm, rope, repeat_kv
    attention    attention with heads split across ranks
    grid         grid mode: both operands in 2-D blocks
    speed        each rank's measured speed (speed profiles), for shares from speed
"""

from . import attention, cache, elementwise, grid, handles, matmul, nodeops, placement, setup, speed  # noqa: F401
