"""Quantised weights on OpenCL devices: ggml's q8_0 / q4_0 blocks kept as they are in a
device buffer (1.06 or 0.56 bytes per value) and multiplied by cmatrix's own kernels
(``kernels/quant.cl``), which dequantise as they read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyopencl as cl

from ..core import quant as q
from ..core.dtypes import from_float32, to_float32
from ..errors import CMatrixError


class CLBlocks:
    """A matrix of logical ``shape`` quantised as ``kind`` along ``axis`` (the axis its
    products contract over), its blocks in ``buffer``: one line of blocks per row (axis 1)
    or per column (axis 0)."""

    __slots__ = ("buffer", "kind", "axis", "shape", "lines", "width")

    def __init__(self, buffer: cl.Buffer, kind: str, axis: int, shape: tuple[int, int]) -> None:
        self.buffer, self.kind, self.axis, self.shape = buffer, kind, axis, tuple(shape)
        self.width = shape[axis]
        self.lines = shape[1 - axis]


class DeviceBlocks:
    """OpenCL backend mixin: quantised uploads stay :class:`CLBlocks` on the device. Hooks it
    uses: ``context``, ``queue``, ``_kernel(file, name, a_dtype, b_dtype)``, ``_run`` and
    ``_empty(shape)`` of the OpenCL backend; everything else goes to it (``super()``)."""

    def upload(self, data: np.ndarray, dtype: str, quant: str | None = None, quant_axis: int = 0) -> Any:
        if quant is None:
            return super().upload(data, dtype, quant, quant_axis)
        q.check_kind(quant)
        if data.ndim != 2 or quant_axis not in (0, 1):
            raise CMatrixError(f"quantised blocks need a 2-D matrix and axis 0 or 1, got {data.shape}")
        values = to_float32(data, dtype)
        blocks = q.quantize(values.T if quant_axis == 0 else values, quant)
        flags = cl.mem_flags.READ_ONLY
        if blocks.nbytes:
            buffer = cl.Buffer(self.context, flags | cl.mem_flags.COPY_HOST_PTR, hostbuf=blocks)
        else:
            buffer = cl.Buffer(self.context, flags, 1)
        return CLBlocks(buffer, quant, quant_axis, values.shape)

    def download(self, x: Any, dtype: str) -> np.ndarray:
        if not isinstance(x, CLBlocks):
            return super().download(x, dtype)
        blocks = np.empty((x.lines, x.width // q.BLOCK * q.BLOCK_BYTES[x.kind]), dtype=np.uint8)
        if blocks.nbytes:
            cl.enqueue_copy(self.queue, blocks, x.buffer, is_blocking=True)
        lines = q.dequantize(blocks, x.kind)
        return from_float32(np.ascontiguousarray(lines.T) if x.axis == 0 else lines, dtype)

    def free(self, x: Any) -> None:
        if isinstance(x, CLBlocks):
            if x.buffer is not None:
                x.buffer.release()
                x.buffer = None
            return
        super().free(x)

    def matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        if isinstance(a, CLBlocks):
            raise CMatrixError(f"a {a.kind} block can only be the weight b of a matmul")
        if not isinstance(b, CLBlocks):
            return super().matmul(a, b, transpose_a, transpose_b)
        if (1 if transpose_b else 0) != b.axis:
            raise CMatrixError(f"a {b.kind} matrix quantised along axis {b.axis} can only be multiplied "
                               f"along that axis (transpose_b={transpose_b})")
        m, k = a.shape[::-1] if transpose_a else a.shape
        if k != b.width:
            raise CMatrixError(f"matmul: inner dimensions differ: op(a) is {m}x{k}, the weight's lines "
                               f"hold {b.width}")
        out = self._empty((m, b.lines))
        if m * b.lines == 0:
            return out
        group = (16, 1)
        size = (-(-b.lines // group[0]) * group[0], m)
        head = (np.int32(m), np.int32(b.lines), np.int32(k))
        if a.dtype == "float32" and not transpose_a:  # rows of float32: the vector kernel
            kernel = self._kernel("quant.cl", f"{b.kind}_rows", a.dtype, "float32")
            self._run(kernel, size, group, *head, a.buffer, b.buffer, out.buffer)
            return out
        a_row, a_col = (1, a.shape[1]) if transpose_a else (a.shape[1], 1)
        kernel = self._kernel("quant.cl", f"{b.kind}_product", a.dtype, "float32")
        strides = (np.int32(a_row), np.int32(a_col))
        self._run(kernel, size, group, *head, *strides, a.buffer, b.buffer, out.buffer)
        return out

    def matmul_float32(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        return self.matmul(a, b, transpose_a, transpose_b)  # every product here is float32

    def stored_bytes(self, dtype: str, quant: str | None = None) -> float:
        return q.BLOCK_BYTES[quant] / q.BLOCK if quant else super().stored_bytes(dtype, quant)
