"""Grid mode (the seed's "System 2"): both operands in 2-D blocks across all ranks.

``cl.grid_matmul(a, b, transpose_a, transpose_b, grid, inner, weights, out)``
computes C = op(a) @ op(b) (op transposes when its flag is set) with the ranks
arranged as a p x q grid: rank r sits at grid row i = r // q, grid column
j = r % q. ``cl.grid_add`` and ``cl.grid_sub`` do op(a) +/- op(b) the same way.

Grid. ``grid=None`` takes the most square factorisation p x q of the number of
ranks with p <= q (4 -> 2x2, 2 -> 1x2, 3 -> 1x3, 1 -> 1x1); ``grid=(p, q)``
must have p * q equal to the number of ranks.

Shares. ``weights`` (default: the cluster's) are per-rank shares as everywhere
in cmatrix. Rows are cut among grid rows in proportion to each grid row's total
share (the sum over its ranks), columns (or the inner dimension) among grid
columns in proportion to each grid column's total share, with the same
largest-remainder rounding as :func:`cmatrix.core.plan.split_counts`. This gives
every rank exactly its share when the shares are of product form
(w[i*q + j] == r[i] * c[j], equal shares included) and approximates them
otherwise. A grid row or column whose total share is 0 gets no rows or columns;
a rank whose block is empty receives nothing.

Output variant (``inner=False``, the default). op(a) (M x K) is cut into p row
blocks A_i, op(b) (K x N) into q column blocks B_j; rank (i, j) receives A_i and
B_j and computes C_ij = A_i @ B_j; the driver assembles C from the p x q blocks.

Inner-dimension variant (``inner=True``). op(a) is cut into p row blocks x q
inner blocks A_ik, op(b) into q inner (row) blocks B_k; rank (i, k) receives
A_ik and B_k and computes the float32 partial product P_ik = A_ik @ B_k (rows i
of C, all N columns). The partials are summed over k within grid row i (a
``Reduce`` on the grid row's sub-communicator, made once per grid shape),
rounded to the result's dtype on rank (i, 0) and gathered to the driver.

Transposes are flags: for a matmul the driver cuts each block from the stored
matrix and the flags travel to the backend; for add and sub it writes op(x)'s
block while packing. Nothing transposes a whole matrix.

Data movement. The driver packs every rank's blocks into one flat byte buffer,
rank by rank (a block that several ranks need is copied once per rank), and
sends it with one ``Scatterv``; results come back with ``Gatherv`` (after the
row ``Reduce`` in the inner variant). Operands are host arrays (numpy, torch,
or file paths); the result comes back like them (torch if either is torch)
with the promoted dtype. ``out`` is None (returned) or a file sink
("h5:PATH#/dataset", "shm:NAME"); "keep" is refused: grid results are not kept
resident. Every argument is checked on the driver before any data moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.arrays import HostArray, check_matrix
from ..core.checks import check_flag
from ..core.dtypes import STORAGE, from_float32, promote
from ..core.gridplan import (
    Grid,
    Split2D,
    assemble,
    choose_grid,
    elementwise_segment,
    is_active,
    matmul_blocks,
    matmul_segment,
    pack,
    split_2d,
    stored,
    views,
)
from ..core.plan import validate_weights
from ..engine.driver import Driver
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import InputError
from ..io import sinks
from ..io.store import from_user
from .handles import Matrix, check_room, deliver, result_kind


@dataclass(frozen=True)
class _GridHeader(Header):
    grid: tuple[int, int]
    row_counts: tuple[int, ...]
    col_counts: tuple[int, ...]
    a_dtype: str
    b_dtype: str
    out_dtype: str
    #: bytes of each rank's part of the driver's flat buffer
    segment_bytes: tuple[int, ...]
    #: elements of each rank's part of the gathered result
    gather_counts: tuple[int, ...]

    @property
    def split(self) -> Split2D:
        return Split2D(Grid(*self.grid), self.row_counts, self.col_counts)


@dataclass(frozen=True)
class GridMatmul(_GridHeader, op="grid_matmul"):
    inner: bool = False
    dims: tuple[int, int, int] = (0, 0, 0)  # m, k, n
    transpose_a: bool = False
    transpose_b: bool = False
    #: bytes the grid rows' sums move together (the driver counts them)
    reduce_bytes: int = 0


@dataclass(frozen=True)
class GridElementwise(_GridHeader, op="grid_elementwise"):
    kind: str = "add"


class GridMethods:
    """``Cluster.grid_matmul``, ``grid_add`` and ``grid_sub``; the one hook used is ``driver``."""

    driver: Driver

    def grid_matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
                    grid: Sequence[int] | None = None, inner: bool = False,
                    weights: Sequence[float] | None = None, out: str | None = None) -> Any:
        """``op(a) @ op(b)`` with both operands cut in 2-D blocks over a p x q grid of ranks.

        ``grid``: (p, q) with p * q == number of ranks, or None for the most
        square. ``inner=False``: rank (i, j) computes C block (i, j) from row
        block i of op(a) and column block j of op(b). ``inner=True``: rank (i, k)
        multiplies op(a)'s block (i, k) by inner block k of op(b); the float32
        partials are summed within each grid row. ``weights``: per-rank shares
        (default the cluster's), turned into grid-row and grid-column shares.
        ``out``: None (returned, numpy or torch like the inputs) or a file sink.
        """
        d = self.driver
        sink = _sink(out)
        ta, tb = check_flag(transpose_a, "transpose_a"), check_flag(transpose_b, "transpose_b")
        inner = check_flag(inner, "inner")
        g, shares = _setup(d, grid, weights)
        host_a, data_a = _operand(a, "a")
        host_b, data_b = _operand(b, "b")
        data_a, ta = _c_order(data_a, ta)
        data_b, tb = _c_order(data_b, tb)
        (m, k), (k_b, n) = _op_shape(data_a, ta), _op_shape(data_b, tb)
        if k != k_b:
            raise InputError(f"grid_matmul: inner dimensions differ: op(a) is {m}x{k} "
                             f"(transpose_a={transpose_a}) but op(b) is {k_b}x{n} "
                             f"(transpose_b={transpose_b}); fix the shapes or the transpose flags")
        check_room(sink, (m, n), promote(host_a.dtype, host_b.dtype))
        split = split_2d(m, k if inner else n, shares, g)
        _check_dtypes(d, split, host_a.dtype, host_b.dtype)
        out_dtype = promote(host_a.dtype, host_b.dtype)
        dims, flags, dtypes = (m, k, n), (ta, tb), (host_a.dtype, host_b.dtype)
        segments = [matmul_segment(split, inner, dims, flags, dtypes, r) for r in range(g.size)]

        def fill(rank: int, blocks: list[np.ndarray]) -> None:
            for view, data, (rows, cols), t in zip(
                    blocks, (data_a, data_b), matmul_blocks(split, inner, m, k, n, rank), flags, strict=True):
                view[...] = data[stored(rows, cols, t)]

        payload, segment_bytes = pack(segments, fill)
        if inner:
            gather = [split.row_counts[r // g.q] * n if r % g.q == 0 else 0 for r in range(g.size)]
        else:
            gather = [int(np.prod(split.block_shape(r))) for r in range(g.size)]
        header = GridMatmul((g.p, g.q), split.row_counts, split.col_counts, host_a.dtype, host_b.dtype,
                            out_dtype, tuple(segment_bytes), tuple(gather), inner, dims, ta, tb,
                            m * n * 4 * (g.q - 1))
        flat = d.run(header, payload)
        result = flat.reshape(m, n) if inner else assemble(flat, split, out_dtype)
        attrs = sinks.describe("grid_matmul", {"a": (None, host_a.shape), "b": (None, host_b.shape)},
                               out_dtype, 0, split.row_counts)
        attrs.update(transpose_a=bool(transpose_a), transpose_b=bool(transpose_b), grid=[g.p, g.q],
                     inner=inner, grid_col_counts=list(split.col_counts))
        return deliver(sink, "grid_matmul", result, out_dtype, result_kind(host_a.kind, host_b.kind), attrs)

    def grid_add(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
                 grid: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 out: str | None = None) -> Any:
        """``op(a) + op(b)`` with both operands cut into the same p x q blocks; rank (i, j)
        adds block (i, j). ``grid``, ``weights`` and ``out`` as in :meth:`grid_matmul`."""
        return _elementwise(self.driver, "add", a, b, transpose_a, transpose_b, grid, weights, out)

    def grid_sub(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
                 grid: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 out: str | None = None) -> Any:
        """``op(a) - op(b)`` with both operands cut into the same p x q blocks; rank (i, j)
        subtracts block (i, j). ``grid``, ``weights`` and ``out`` as in :meth:`grid_matmul`."""
        return _elementwise(self.driver, "sub", a, b, transpose_a, transpose_b, grid, weights, out)


def _elementwise(d: Driver, kind: str, a: Any, b: Any, transpose_a: bool, transpose_b: bool,
                 grid: Sequence[int] | None, weights: Sequence[float] | None, out: str | None) -> Any:
    sink = _sink(out)
    ta, tb = check_flag(transpose_a, "transpose_a"), check_flag(transpose_b, "transpose_b")
    g, shares = _setup(d, grid, weights)
    host_a, data_a = _operand(a, "a")
    host_b, data_b = _operand(b, "b")
    shape_a, shape_b = _op_shape(data_a, ta), _op_shape(data_b, tb)
    if shape_a != shape_b:
        raise InputError(f"grid_{kind}: shapes differ after the transposes: op(a) is "
                         f"{shape_a[0]}x{shape_a[1]} (transpose_a={ta}), op(b) is "
                         f"{shape_b[0]}x{shape_b[1]} (transpose_b={tb}); fix the shapes or the "
                         "transpose flags")
    check_room(sink, shape_a, promote(host_a.dtype, host_b.dtype))
    split = split_2d(*shape_a, shares, g)
    _check_dtypes(d, split, host_a.dtype, host_b.dtype)
    out_dtype = promote(host_a.dtype, host_b.dtype)
    dtypes = (host_a.dtype, host_b.dtype)
    segments = [elementwise_segment(split, dtypes, r) for r in range(g.size)]

    def fill(rank: int, blocks: list[np.ndarray]) -> None:
        rows, cols = split.block(rank)
        for view, data, t in zip(blocks, (data_a, data_b), (ta, tb), strict=True):
            block = data[stored(rows, cols, t)]
            view[...] = block.T if t else block

    payload, segment_bytes = pack(segments, fill)
    gather = tuple(int(np.prod(split.block_shape(r))) for r in range(g.size))
    header = GridElementwise((g.p, g.q), split.row_counts, split.col_counts, host_a.dtype, host_b.dtype,
                             out_dtype, tuple(segment_bytes), gather, kind)
    result = assemble(d.run(header, payload), split, out_dtype)
    attrs = sinks.describe(f"grid_{kind}", {"a": (None, host_a.shape), "b": (None, host_b.shape)},
                           out_dtype, 0, split.row_counts)
    attrs.update(transpose_a=ta, transpose_b=tb, grid=[g.p, g.q], grid_col_counts=list(split.col_counts))
    return deliver(sink, f"grid_{kind}", result, out_dtype, result_kind(host_a.kind, host_b.kind), attrs)


def _setup(d: Driver, grid: Sequence[int] | None, weights: Sequence[float] | None
           ) -> tuple[Grid, np.ndarray]:
    g = choose_grid(d.size, grid)
    shares = d.weights if weights is None else validate_weights(weights, d.size)
    return g, shares


def _check_dtypes(d: Driver, split: Split2D, *dtypes: str) -> None:
    counts = [1 if is_active(split, r) else 0 for r in range(d.size)]
    for dtype in dict.fromkeys(dtypes):
        d.check_dtype(dtype, counts)


def _operand(x: Any, arg: str) -> tuple[HostArray, np.ndarray]:
    """A user operand as host storage, and its data (2-D, non-empty)."""
    if isinstance(x, Matrix):
        raise InputError(f"{arg}: grid mode takes arrays, tensors or file paths; pass "
                         f"{arg}.gather() for a matrix that is on the cluster")
    host = from_user(x, arg)
    check_matrix(host, arg)
    return host, host.data


def _c_order(data: np.ndarray, transposed: bool) -> tuple[np.ndarray, bool]:
    """A transposed view (F-ordered) is used as its C-ordered base with the flag flipped."""
    if not data.flags.c_contiguous and data.T.flags.c_contiguous:
        return data.T, not transposed
    return data, transposed


def _op_shape(data: np.ndarray, transposed: bool) -> tuple[int, int]:
    rows, cols = data.shape
    return (cols, rows) if transposed else (rows, cols)


def _sink(out: str | None) -> sinks.Sink:
    sink = sinks.parse(out)
    if sink.keep:
        raise InputError("out='keep': grid results are not kept resident; use out=None, a file "
                         "sink ('h5:PATH#/dataset', 'shm:NAME'), or cl.matmul(..., out='keep')")
    return sink


# ---- rank halves: each follows the step/sync protocol; ranks whose block is empty receive
# nothing and send nothing but take part in every collective ------------------------------

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


@on_ranks(GridMatmul)
def _grid_matmul(rt: Runtime, h: GridMatmul, payload: np.ndarray | None) -> np.ndarray | None:
    """Rank (i, j) multiplies the blocks the driver sent it.

    Output variant: C_ij = op(A)_i @ op(B)_j, gathered to the driver.
    Inner variant: float32 P_ij = op(A)_ij @ op(B)_j, summed over j within grid
    row i onto rank (i, 0), narrowed to the output dtype there, then gathered.
    Returns the driver's flat result buffer (None on workers).
    """
    comm, rank, split = rt.comm, rt.comm.rank, h.split
    dtypes = (h.a_dtype, h.b_dtype)
    transposes = (h.transpose_a, h.transpose_b)
    m, _, n = h.dims
    with rt.step("prepare"):
        blocks = matmul_segment(split, h.inner, h.dims, transposes, dtypes, rank)
        i, _ = split.grid.coords(rank)
        out_shape = (split.row_counts[i], n) if h.inner else split.block_shape(rank)
        recv = np.empty(h.segment_bytes[rank], dtype=np.uint8)
    rt.sync()
    comm.scatter_flat(payload, recv, h.segment_bytes)
    group = comm.row_group(split.grid.p, split.grid.q) if h.inner else None
    full = None
    with rt.step("compute"):
        parts = views(recv, blocks)
        result_dtype = "float32" if h.inner else h.out_dtype
        if parts:
            def product(a: Any, b: Any) -> Any:
                return rt.backend.matmul(a, b, *transposes, partial=h.inner)

            part = _compute(rt, parts, dtypes, product, result_dtype)
        else:  # an empty block: an empty result, or a zero partial for the row's sum
            part = np.zeros(out_shape, dtype=STORAGE[result_dtype])
        total = np.empty(out_shape, dtype=np.float32) if h.inner and group.is_root else None
        if comm.is_driver:
            full = np.empty(sum(h.gather_counts), dtype=STORAGE[h.out_dtype])
    rt.sync()
    if h.inner:
        comm.group_reduce_sum(group, part, total, moved=h.reduce_bytes)
        with rt.step("narrow"):
            part = from_float32(total, h.out_dtype) if group.is_root else \
                np.empty((0, n), dtype=STORAGE[h.out_dtype])
        rt.sync()
    comm.gather_flat(part.reshape(-1), full, h.gather_counts)
    return full


@on_ranks(GridElementwise)
def _grid_elementwise(rt: Runtime, h: GridElementwise, payload: np.ndarray | None) -> np.ndarray | None:
    """Rank (i, j) adds or subtracts its blocks of op(a) and op(b); the blocks are gathered.
    Returns the driver's flat result buffer (None on workers)."""
    comm, rank, split = rt.comm, rt.comm.rank, h.split
    dtypes = (h.a_dtype, h.b_dtype)
    with rt.step("prepare"):
        blocks = elementwise_segment(split, dtypes, rank)
        recv = np.empty(h.segment_bytes[rank], dtype=np.uint8)
    rt.sync()
    comm.scatter_flat(payload, recv, h.segment_bytes)
    full = None
    with rt.step("compute"):
        parts = views(recv, blocks)
        fn = rt.backend.add if h.kind == "add" else rt.backend.sub
        if parts:
            part = _compute(rt, parts, dtypes, fn, h.out_dtype)
        else:
            part = np.empty(split.block_shape(rank), dtype=STORAGE[h.out_dtype])
        if comm.is_driver:
            full = np.empty(sum(h.gather_counts), dtype=STORAGE[h.out_dtype])
    rt.sync()
    comm.gather_flat(part.reshape(-1), full, h.gather_counts)
    return full
