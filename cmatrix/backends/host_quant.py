"""Quantised weights kept as ggml's blocks in host memory, for the backends without
quantised kernels of their own (numpy, and torch on the CPU): 1.06 (q8_0) or 0.56 (q4_0)
bytes per value instead of the 4 of the float32 values they stand for.

A product dequantises a tile of rows at a time (a few MiB), so the float32 weight never
exists whole; the result is the product with the dequantised weight, exactly. The LLM
decoder's ggml graphs instead borrow the blocks as they lie (see
:class:`cmatrix.backends.ggml_tensors.Borrowed`) and multiply them with ggml's kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ..core import quant as q
from ..core.arrays import aligned
from ..core.dtypes import from_float32, to_float32
from ..errors import CMatrixError

#: float32 bytes one tile of dequantised rows may take
TILE_BYTES = 4 << 20


class QuantBlocks:
    """A matrix of logical ``shape`` quantised as ``kind`` in blocks along ``axis`` (the axis
    its products contract over). ``blocks`` holds one row of blocks per line along that axis:
    the rows of the matrix for axis 1, its columns for axis 0."""

    def __init__(self, values: np.ndarray, kind: str, axis: int) -> None:
        if values.ndim != 2 or axis not in (0, 1):
            raise CMatrixError(f"quantised blocks need a 2-D matrix and axis 0 or 1, got {values.shape}")
        q.check_row_length(values.shape[axis], kind)
        lines = values.T if axis == 0 else values
        self.blocks = aligned(np.empty((lines.shape[0], lines.shape[1] // q.BLOCK * q.BLOCK_BYTES[kind]),
                                       dtype=np.uint8))
        q.quantize(lines, kind, out=self.blocks)
        self.kind, self.axis, self.shape = kind, axis, tuple(values.shape)
        self.width = values.shape[axis]  # values per line

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def host_bytes(self) -> np.ndarray:
        """The blocks as uint8 lines in host memory (for ggml to use as they lie)."""
        return self.blocks

    def values(self) -> np.ndarray:
        """The dequantised matrix (float32, its logical shape)."""
        lines = q.dequantize(self.blocks, self.kind)
        return np.ascontiguousarray(lines.T) if self.axis == 0 else lines

    def product(self, a: np.ndarray, transpose_a: bool = False, transpose_b: bool = False) -> np.ndarray:
        """op(a) @ op(this matrix), float32, dequantising a tile of lines at a time."""
        a = np.asarray(a, dtype=np.float32)
        a = a.T if transpose_a else a
        if (1 if transpose_b else 0) != self.axis:
            raise CMatrixError(f"a {self.kind} matrix quantised along axis {self.axis} can only be "
                               f"multiplied along that axis (transpose_b={transpose_b})")
        lines = self.blocks.shape[0]
        out = np.empty((a.shape[0], lines), dtype=np.float32)
        step = max(1, TILE_BYTES // (4 * self.width))
        for start in range(0, lines, step):
            tile = q.dequantize(self.blocks[start:start + step], self.kind)
            np.matmul(a, tile.T, out=out[:, start:start + step])
        return out


class HostBlocks:
    """Backend mixin: quantised uploads stay :class:`QuantBlocks` in host memory, and products
    with them dequantise tile by tile. Hooks it uses: ``keeps_blocks`` (False sends quantised
    uploads down the backend's own path), ``to_host(handle)`` (a float32 numpy view or copy),
    ``from_host(array)`` (a handle of the backend) and ``threads`` (BLAS threads for the
    products); everything else goes to the backend (``super()``)."""

    keeps_blocks = True

    def to_host(self, x: Any) -> np.ndarray:
        return x

    def from_host(self, array: np.ndarray) -> Any:
        return array

    def upload(self, data: np.ndarray, dtype: str, quant: str | None = None, quant_axis: int = 0) -> Any:
        if quant is None or not self.keeps_blocks:
            return super().upload(data, dtype, quant, quant_axis)
        q.check_kind(quant)
        return QuantBlocks(to_float32(data, dtype), quant, quant_axis)

    def download(self, x: Any, dtype: str) -> np.ndarray:
        if isinstance(x, QuantBlocks):
            return from_float32(x.values(), dtype)
        return super().download(x, dtype)

    def matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        if isinstance(b, QuantBlocks):
            with threadpool_limits(limits=self.threads, user_api="blas"):  # the rank's threads, not all
                return self.from_host(b.product(self.to_host(a), transpose_a, transpose_b))
        if isinstance(a, QuantBlocks):
            raise CMatrixError(f"a {a.kind} block can only be the weight b of a matmul")
        return super().matmul(a, b, transpose_a, transpose_b)

    def matmul_float32(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        if isinstance(b, QuantBlocks):
            return self.matmul(a, b, transpose_a, transpose_b)  # always float32
        return super().matmul_float32(a, b, transpose_a, transpose_b)

    def free(self, x: Any) -> None:
        if not isinstance(x, QuantBlocks):
            super().free(x)

    def stored_bytes(self, dtype: str, quant: str | None = None) -> float:
        if quant and self.keeps_blocks:
            return q.BLOCK_BYTES[quant] / q.BLOCK
        return super().stored_bytes(dtype, quant)
