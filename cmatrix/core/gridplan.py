"""Pure planning for grid mode (see :mod:`cmatrix.ops.grid`): no MPI, no backends.

Every rank can rebuild the same plan from the command header: the p x q grid
of ranks, how a matrix's rows and columns are cut among grid rows and grid
columns, and how a rank's blocks lie in the flat byte buffer the driver scatters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .dtypes import STORAGE, empty
from .plan import split_counts, validate_weights

#: every block in a rank's flat segment starts at a multiple of this many bytes
ALIGN = 8


@dataclass(frozen=True)
class Grid:
    """``p`` x ``q`` ranks; rank ``r`` sits at grid row ``r // q``, grid column ``r % q``."""

    p: int
    q: int

    @property
    def size(self) -> int:
        return self.p * self.q

    def coords(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.q)

    def rank(self, i: int, j: int) -> int:
        return i * self.q + j


def choose_grid(size: int, grid: Sequence[int] | None = None) -> Grid:
    """``grid=None``: the most square p x q with p <= q and p * q == size (4 -> 2x2,
    2 -> 1x2, 3 -> 1x3, 6 -> 2x3); otherwise check that ``grid`` is (p, q) with p * q == size."""
    if grid is None:
        p = int(np.sqrt(size))
        while size % p:
            p -= 1
        return Grid(p, size // p)
    try:
        p, q = grid
    except (TypeError, ValueError):
        raise InputError(f"grid: expected (p, q) with p * q == {size} ranks, got {grid!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1 for x in (p, q)):
        raise InputError(f"grid: p and q must be positive integers, got {grid!r}")
    if p * q != size:
        raise InputError(f"grid: p x q = {p} x {q} = {p * q} but the cluster has {size} ranks; "
                         f"choose p and q with p * q == {size}, or grid=None for the most square")
    return Grid(int(p), int(q))


def grid_shares(weights: Sequence[float], grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank shares -> (share of each grid row, share of each grid column).

    A grid row's share is the sum of its ranks' shares (over j), a grid
    column's the sum over i. When the shares are of product form
    (w[i*q+j] == r[i] * c[j]) each rank's block is exactly its share of the
    matrix; otherwise the blocks only approximate the shares.
    """
    w = validate_weights(weights, grid.size).reshape(grid.p, grid.q)
    return w.sum(axis=1), w.sum(axis=0)


@dataclass(frozen=True)
class Split2D:
    """A rows x cols matrix cut into p row blocks and q column blocks; rank (i, j)
    owns block (i, j)."""

    grid: Grid
    row_counts: tuple[int, ...]
    col_counts: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(self.row_counts), sum(self.col_counts)

    @staticmethod
    def _slice(counts: tuple[int, ...], index: int) -> slice:
        start = sum(counts[:index])
        return slice(start, start + counts[index])

    def rows(self, i: int) -> slice:
        """Rows of grid row ``i``."""
        return self._slice(self.row_counts, i)

    def cols(self, j: int) -> slice:
        """Columns of grid column ``j``."""
        return self._slice(self.col_counts, j)

    def block(self, rank: int) -> tuple[slice, slice]:
        i, j = self.grid.coords(rank)
        return self.rows(i), self.cols(j)

    def block_shape(self, rank: int) -> tuple[int, int]:
        i, j = self.grid.coords(rank)
        return self.row_counts[i], self.col_counts[j]


def split_2d(rows: int, cols: int, weights: Sequence[float], grid: Grid) -> Split2D:
    """Cut ``rows`` among grid rows and ``cols`` among grid columns in proportion to
    their total shares (largest-remainder rounding, a zero total gets nothing)."""
    row_w, col_w = grid_shares(weights, grid)
    return Split2D(grid, tuple(int(c) for c in split_counts(rows, row_w)),
                   tuple(int(c) for c in split_counts(cols, col_w)))


def stored(rows: slice, cols: slice, transposed: bool) -> tuple[slice, slice]:
    """Index into the stored matrix of block ``[rows, cols]`` of op(x) (x.T when ``transposed``)."""
    return (cols, rows) if transposed else (rows, cols)


def stored_shape(shape: tuple[int, int], transposed: bool) -> tuple[int, int]:
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def matmul_blocks(split: Split2D, inner: bool, m: int, k: int, n: int, rank: int
                  ) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Blocks of op(a) (m x k) and op(b) (k x n) that ``rank`` multiplies.

    Output variant: ``split`` cuts C (m x n); rank (i, j) takes rows i of op(a)
    and columns j of op(b). Inner variant: ``split`` cuts op(a) (m x k); rank
    (i, k) takes op(a)'s block (i, k) and inner rows k of op(b).
    """
    i, j = split.grid.coords(rank)
    if inner:
        return (split.rows(i), split.cols(j)), (split.cols(j), slice(0, n))
    return (split.rows(i), slice(0, k)), (slice(0, k), split.cols(j))


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def layout(blocks: Sequence[tuple[str, tuple[int, int]]]) -> tuple[list[int], int]:
    """Byte offsets of ``blocks`` ((dtype, shape) each) in one flat segment, each
    aligned to ALIGN bytes, and the segment's total length in bytes."""
    offsets, end = [], 0
    for dtype, shape in blocks:
        offsets.append(end)
        nbytes = _size(shape) * STORAGE[dtype].itemsize
        end += -(-nbytes // ALIGN) * ALIGN
    return offsets, end


def views(segment: np.ndarray, blocks: Sequence[tuple[str, tuple[int, int]]]) -> list[np.ndarray]:
    """The blocks of a flat uint8 ``segment`` (see :func:`layout`) as typed 2-D arrays."""
    offsets, _ = layout(blocks)
    out = []
    for (dtype, shape), start in zip(blocks, offsets, strict=True):
        nbytes = _size(shape) * STORAGE[dtype].itemsize
        out.append(segment[start : start + nbytes].view(STORAGE[dtype]).reshape(shape))
    return out


def is_active(split: Split2D, rank: int) -> bool:
    """Whether ``rank``'s block is non-empty (a rank with an empty block gets no data)."""
    rows, cols = split.block_shape(rank)
    return rows * cols > 0


def matmul_segment(split: Split2D, inner: bool, dims: tuple[int, int, int], transposes: tuple[bool, bool],
                   dtypes: tuple[str, str], rank: int) -> list[tuple[str, tuple[int, int]]]:
    """(dtype, stored shape) of the a and b blocks the driver sends ``rank`` (none if inactive).

    Blocks are cut from the stored matrices; the transpose flags travel to the backend.
    """
    if not is_active(split, rank):
        return []
    m, k, n = dims
    out = []
    for (rows, cols), t, dtype in zip(matmul_blocks(split, inner, m, k, n, rank), transposes, dtypes,
                                      strict=True):
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        out.append((dtype, stored_shape(shape, t)))
    return out


def elementwise_segment(split: Split2D, dtypes: tuple[str, str], rank: int
                        ) -> list[tuple[str, tuple[int, int]]]:
    """(dtype, shape) of the op(a) and op(b) blocks the driver sends ``rank`` (already transposed)."""
    if not is_active(split, rank):
        return []
    shape = split.block_shape(rank)
    return [(dtypes[0], shape), (dtypes[1], shape)]


Segment = list[tuple[str, tuple[int, int]]]


def pack(segments: list[Segment], fill: Callable[[int, list[np.ndarray]], None]
         ) -> tuple[np.ndarray, list[int]]:
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


def assemble(flat: np.ndarray, split: Split2D, dtype: str) -> np.ndarray:
    """The driver's gathered blocks (rank order, each C-ordered) -> the whole matrix."""
    grid = split.grid
    if grid.q == 1:  # row blocks in order: already the matrix
        return flat.reshape(split.shape)
    full = empty(split.shape, dtype)
    start = 0
    for rank in range(grid.size):
        rows, cols = split.block_shape(rank)
        block = flat[start : start + rows * cols].reshape(rows, cols)
        full[split.block(rank)] = block
        start += rows * cols
    return full
