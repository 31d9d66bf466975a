"""Rank half of grid mode (see :mod:`cmatrix.grid`).

Each command follows the step/sync protocol of :mod:`cmatrix.runtime`: the
buffers are prepared in a step, every rank syncs, the driver's flat buffer is
scattered (one ``Scatterv``), each rank computes its block in a step, syncs,
and the results travel back (``Gatherv``; the inner-dimension variant first
sums partial products within each grid row with a ``Reduce``). Ranks whose
block is empty receive nothing and send nothing but take part in every
collective.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dtypes import STORAGE, from_float32
from .gridplan import Grid, Split2D, elementwise_segment, matmul_segment, views
from .runtime import Runtime, command


def _split(h: dict) -> Split2D:
    return Split2D(Grid(*h["grid"]), tuple(h["row_counts"]), tuple(h["col_counts"]))


def _compute(rt: Runtime, blocks: list[np.ndarray], dtypes: tuple[str, str], fn: Any, result_dtype: str
             ) -> np.ndarray:
    """Upload the two blocks, apply ``fn`` to them, download the result; free everything."""
    device = rt.backend
    held = []
    try:
        for block, dtype in zip(blocks, dtypes, strict=True):
            held.append(device.upload(block, dtype))
        held.append(fn(*held[:2]))
        return device.download(held[-1], result_dtype)
    finally:
        for x in held:
            device.free(x)


@command("grid_matmul")
def grid_matmul(rt: Runtime, h: dict, payload: np.ndarray | None) -> np.ndarray | None:
    """Rank (i, j) multiplies the blocks the driver sent it.

    Output variant: C_ij = op(A)_i @ op(B)_j, gathered to the driver.
    Inner variant: float32 P_ij = op(A)_ij @ op(B)_j, summed over j within grid
    row i onto rank (i, 0), narrowed to the output dtype there, then gathered.
    Returns the driver's flat result buffer (None on workers).
    """
    comm, rank = rt.comm, rt.comm.rank
    split = _split(h)
    inner = h["inner"]
    dtypes = (h["a_dtype"], h["b_dtype"])
    transposes = (h["transpose_a"], h["transpose_b"])
    m, _, n = h["dims"]
    with rt.step("prepare"):
        blocks = matmul_segment(split, inner, tuple(h["dims"]), transposes, dtypes, rank)
        i, _ = split.grid.coords(rank)
        rows = split.row_counts[i]
        out_shape = (rows, n) if inner else split.block_shape(rank)
        recv = np.empty(h["segment_bytes"][rank], dtype=np.uint8)
    rt.sync()
    comm.scatter_flat(payload, recv, h["segment_bytes"])
    group = comm.row_group(split.grid.p, split.grid.q) if inner else None
    full = None
    with rt.step("compute"):
        parts = views(recv, blocks)
        result_dtype = "float32" if inner else h["out_dtype"]
        if parts:
            def product(a: Any, b: Any) -> Any:
                return rt.backend.matmul(a, b, *transposes, partial=inner)

            part = _compute(rt, parts, dtypes, product, result_dtype)
        else:  # an empty block: an empty result, or a zero partial for the row's sum
            part = np.zeros(out_shape, dtype=STORAGE[result_dtype])
        total = np.empty(out_shape, dtype=np.float32) if inner and group.is_root else None
        if comm.is_driver:
            full = np.empty(sum(h["gather_counts"]), dtype=STORAGE[h["out_dtype"]])
    rt.sync()
    if inner:
        comm.group_reduce_sum(group, part, total, moved=h["reduce_bytes"])
        with rt.step("narrow"):
            part = from_float32(total, h["out_dtype"]) if group.is_root else \
                np.empty((0, n), dtype=STORAGE[h["out_dtype"]])
        rt.sync()
    comm.gather_flat(part.reshape(-1), full, h["gather_counts"])
    return full


@command("grid_elementwise")
def grid_elementwise(rt: Runtime, h: dict, payload: np.ndarray | None) -> np.ndarray | None:
    """Rank (i, j) adds or subtracts its blocks of op(a) and op(b); the blocks are gathered.
    Returns the driver's flat result buffer (None on workers)."""
    comm, rank = rt.comm, rt.comm.rank
    split = _split(h)
    dtypes = (h["a_dtype"], h["b_dtype"])
    with rt.step("prepare"):
        blocks = elementwise_segment(split, dtypes, rank)
        recv = np.empty(h["segment_bytes"][rank], dtype=np.uint8)
    rt.sync()
    comm.scatter_flat(payload, recv, h["segment_bytes"])
    full = None
    with rt.step("compute"):
        parts = views(recv, blocks)
        fn = rt.backend.add if h["kind"] == "add" else rt.backend.sub
        if parts:
            part = _compute(rt, parts, dtypes, fn, h["out_dtype"])
        else:
            part = np.empty(split.block_shape(rank), dtype=STORAGE[h["out_dtype"]])
        if comm.is_driver:
            full = np.empty(sum(h["gather_counts"]), dtype=STORAGE[h["out_dtype"]])
    rt.sync()
    comm.gather_flat(part.reshape(-1), full, h["gather_counts"])
    return full
