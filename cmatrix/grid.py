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
largest-remainder rounding as :func:`cmatrix.plan.split_counts`. This gives
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
from typing import TYPE_CHECKING, Any

import numpy as np

from . import sinks
from .arrays import HostArray, check_matrix, from_user, to_user
from .dtypes import STORAGE, promote
from .errors import InputError
from .gridplan import (
    Grid,
    Split2D,
    choose_grid,
    elementwise_segment,
    is_active,
    layout,
    matmul_blocks,
    matmul_segment,
    split_2d,
    stored,
    views,
)
from .matrix import Matrix
from .plan import validate_weights

if TYPE_CHECKING:
    from .cluster import Cluster


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


def _flag(value: Any, arg: str) -> bool:
    if not isinstance(value, (bool, np.bool_, int, np.integer)) or value not in (0, 1):
        raise InputError(f"{arg}: expected True or False, got {value!r}")
    return bool(value)


def _pack(segments: list[list[tuple[str, tuple[int, int]]]], fill: Any) -> tuple[np.ndarray, list[int]]:
    """One flat uint8 buffer holding every rank's segment in rank order.

    ``fill(rank, views)`` writes rank's blocks into their typed views.
    """
    sizes = [layout(seg)[1] for seg in segments]
    buf = np.empty(sum(sizes), dtype=np.uint8)
    start = 0
    for rank, (seg, size) in enumerate(zip(segments, sizes, strict=True)):
        if seg:
            fill(rank, views(buf[start : start + size], seg))
        start += size
    return buf, sizes


def _assemble(flat: np.ndarray, split: Split2D, dtype: str) -> np.ndarray:
    """The driver's gathered blocks (rank order, each C-ordered) -> the whole matrix."""
    grid = split.grid
    if grid.q == 1:  # row blocks in order: already the matrix
        return flat.reshape(split.shape)
    full = np.empty(split.shape, dtype=STORAGE[dtype])
    start = 0
    for rank in range(grid.size):
        rows, cols = split.block_shape(rank)
        block = flat[start : start + rows * cols].reshape(rows, cols)
        full[split.block(rank)] = block
        start += rows * cols
    return full


class GridOps:
    """Mixed into :class:`cmatrix.Cluster`: grid mode, both operands in 2-D blocks."""

    def _grid_setup(self: Cluster, grid: Sequence[int] | None, weights: Sequence[float] | None
                    ) -> tuple[Grid, np.ndarray]:
        g = choose_grid(self.size, grid)
        shares = self.weights if weights is None else validate_weights(weights, self.size)
        return g, shares

    def _grid_dtypes(self: Cluster, split: Split2D, *dtypes: str) -> None:
        counts = [1 if is_active(split, r) else 0 for r in range(self.size)]
        for dtype in dict.fromkeys(dtypes):
            self._check_dtype(dtype, counts)

    def grid_matmul(self: Cluster, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
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
        sink = _sink(out)
        ta, tb = _flag(transpose_a, "transpose_a"), _flag(transpose_b, "transpose_b")
        inner = _flag(inner, "inner")
        g, shares = self._grid_setup(grid, weights)
        host_a, data_a = _operand(a, "a")
        host_b, data_b = _operand(b, "b")
        data_a, ta = _c_order(data_a, ta)
        data_b, tb = _c_order(data_b, tb)
        (m, k), (k_b, n) = _op_shape(data_a, ta), _op_shape(data_b, tb)
        if k != k_b:
            raise InputError(f"grid_matmul: inner dimensions differ: op(a) is {m}x{k} "
                             f"(transpose_a={transpose_a}) but op(b) is {k_b}x{n} "
                             f"(transpose_b={transpose_b}); fix the shapes or the transpose flags")
        split = split_2d(m, k if inner else n, shares, g)
        self._grid_dtypes(split, host_a.dtype, host_b.dtype)
        out_dtype = promote(host_a.dtype, host_b.dtype)
        kind = "torch" if "torch" in (host_a.kind, host_b.kind) else "numpy"
        dims, flags, dtypes = (m, k, n), (ta, tb), (host_a.dtype, host_b.dtype)
        segments = [matmul_segment(split, inner, dims, flags, dtypes, r) for r in range(g.size)]

        def fill(rank: int, blocks: list[np.ndarray]) -> None:
            for view, data, (rows, cols), t in zip(
                    blocks, (data_a, data_b), matmul_blocks(split, inner, m, k, n, rank), flags, strict=True):
                view[...] = data[stored(rows, cols, t)]

        payload, segment_bytes = _pack(segments, fill)
        if inner:
            gather = [split.row_counts[r // g.q] * n if r % g.q == 0 else 0 for r in range(g.size)]
        else:
            gather = [int(np.prod(split.block_shape(r))) for r in range(g.size)]
        header = {"op": "grid_matmul", "grid": (g.p, g.q), "inner": inner,
                  "row_counts": split.row_counts, "col_counts": split.col_counts, "dims": dims,
                  "transpose_a": ta, "transpose_b": tb, "a_dtype": host_a.dtype,
                  "b_dtype": host_b.dtype, "out_dtype": out_dtype, "segment_bytes": segment_bytes,
                  "gather_counts": gather, "reduce_bytes": m * n * 4 * (g.q - 1)}
        flat = self._run(header, payload)
        result = flat.reshape(m, n) if inner else _assemble(flat, split, out_dtype)
        if sink.is_file:
            attrs = sinks.describe("grid_matmul", {"a": (None, host_a.shape), "b": (None, host_b.shape)},
                                   out_dtype, 0, split.row_counts)
            attrs.update(transpose_a=bool(transpose_a), transpose_b=bool(transpose_b), grid=[g.p, g.q],
                         inner=inner, grid_col_counts=list(split.col_counts))
            return sinks.deliver(sink, result, out_dtype, attrs, "grid_matmul")
        return to_user(result, out_dtype, kind)

    def grid_add(self: Cluster, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
                 grid: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 out: str | None = None) -> Any:
        """``op(a) + op(b)`` with both operands cut into the same p x q blocks; rank (i, j)
        adds block (i, j). ``grid``, ``weights`` and ``out`` as in :meth:`grid_matmul`."""
        return self._grid_elementwise("add", a, b, transpose_a, transpose_b, grid, weights, out)

    def grid_sub(self: Cluster, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
                 grid: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 out: str | None = None) -> Any:
        """``op(a) - op(b)`` with both operands cut into the same p x q blocks; rank (i, j)
        subtracts block (i, j). ``grid``, ``weights`` and ``out`` as in :meth:`grid_matmul`."""
        return self._grid_elementwise("sub", a, b, transpose_a, transpose_b, grid, weights, out)

    def _grid_elementwise(self: Cluster, kind: str, a: Any, b: Any, transpose_a: bool, transpose_b: bool,
                          grid: Sequence[int] | None, weights: Sequence[float] | None,
                          out: str | None) -> Any:
        sink = _sink(out)
        ta, tb = _flag(transpose_a, "transpose_a"), _flag(transpose_b, "transpose_b")
        g, shares = self._grid_setup(grid, weights)
        host_a, data_a = _operand(a, "a")
        host_b, data_b = _operand(b, "b")
        shape_a, shape_b = _op_shape(data_a, ta), _op_shape(data_b, tb)
        if shape_a != shape_b:
            raise InputError(f"grid_{kind}: shapes differ after the transposes: op(a) is "
                             f"{shape_a[0]}x{shape_a[1]} (transpose_a={ta}), op(b) is "
                             f"{shape_b[0]}x{shape_b[1]} (transpose_b={tb}); fix the shapes or the "
                             "transpose flags")
        split = split_2d(*shape_a, shares, g)
        self._grid_dtypes(split, host_a.dtype, host_b.dtype)
        out_dtype = promote(host_a.dtype, host_b.dtype)
        result_kind = "torch" if "torch" in (host_a.kind, host_b.kind) else "numpy"
        dtypes = (host_a.dtype, host_b.dtype)
        segments = [elementwise_segment(split, dtypes, r) for r in range(g.size)]

        def fill(rank: int, blocks: list[np.ndarray]) -> None:
            rows, cols = split.block(rank)
            for view, data, t in zip(blocks, (data_a, data_b), (ta, tb), strict=True):
                block = data[stored(rows, cols, t)]
                view[...] = block.T if t else block

        payload, segment_bytes = _pack(segments, fill)
        gather = [int(np.prod(split.block_shape(r))) for r in range(g.size)]
        header = {"op": "grid_elementwise", "kind": kind, "grid": (g.p, g.q),
                  "row_counts": split.row_counts, "col_counts": split.col_counts,
                  "a_dtype": host_a.dtype, "b_dtype": host_b.dtype, "out_dtype": out_dtype,
                  "segment_bytes": segment_bytes, "gather_counts": gather}
        flat = self._run(header, payload)
        result = _assemble(flat, split, out_dtype)
        if sink.is_file:
            attrs = sinks.describe(f"grid_{kind}", {"a": (None, host_a.shape), "b": (None, host_b.shape)},
                                   out_dtype, 0, split.row_counts)
            attrs.update(transpose_a=ta, transpose_b=tb, grid=[g.p, g.q],
                         grid_col_counts=list(split.col_counts))
            return sinks.deliver(sink, result, out_dtype, attrs, f"grid_{kind}")
        return to_user(result, out_dtype, result_kind)
