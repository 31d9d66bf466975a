"""Quantised weights kept as ggml's blocks on a torch rank's device (a GPU): 1.06 (q8_0) or
0.56 (q4_0) bytes per value of device memory instead of the 4 of their float32 values.

The blocks are made on the host a tile at a time (:class:`~cmatrix.backends.host_quant.QuantBlocks`)
and moved to the device as bytes; a product dequantises a tile of lines there with torch
operations (a few MiB at a time) and multiplies it in float32, so the result is exactly the
product with the dequantised weight, as on every other backend. CPU torch ranks keep their
blocks in host memory instead (:mod:`.host_quant`), where the LLM's ggml graphs use them
as they lie; ``CMATRIX_TORCH_BLOCKS=device`` puts them on the CPU "device" too (the tests
run this GPU path that way on machines without a GPU).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..core import quant as q
from ..core.dtypes import from_float32, to_float32
from ..errors import CMatrixError
from .host_quant import TILE_BYTES, QuantBlocks


def dequantize(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 lines of ``kind`` blocks (on any device) -> float32 lines, as core.quant.dequantize."""
    lines = blocks.shape[0]
    b = blocks.reshape(lines, -1, q.BLOCK_BYTES[kind])
    d = b[..., :2].contiguous().view(torch.float16).float()  # (lines, blocks, 1)
    if kind == "q8_0":
        codes = b[..., 2:].contiguous().view(torch.int8).float()
    else:
        packed = b[..., 2:]
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float() - 8.0
    return (codes * d).reshape(lines, -1)


class TorchBlocks:
    """:class:`QuantBlocks`' interface with the blocks as a uint8 tensor on ``device``."""

    def __init__(self, host: QuantBlocks, device: torch.device) -> None:
        self.kind, self.axis, self.shape, self.width = host.kind, host.axis, host.shape, host.width
        self.blocks = torch.from_numpy(host.blocks).to(device)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def host_bytes(self) -> np.ndarray | None:
        """The blocks as uint8 lines in host memory when the device is the CPU, else None."""
        return self.blocks.numpy() if self.blocks.device.type == "cpu" else None

    def values(self) -> np.ndarray:
        """The dequantised matrix (float32 numpy, its logical shape)."""
        lines = dequantize(self.blocks, self.kind).cpu().numpy()
        return np.ascontiguousarray(lines.T) if self.axis == 0 else lines

    def product(self, a: torch.Tensor, transpose_a: bool = False, transpose_b: bool = False) -> torch.Tensor:
        """op(a) @ op(this matrix) in float32 on the device, a tile of lines dequantised at a time."""
        if (1 if transpose_b else 0) != self.axis:
            raise CMatrixError(f"a {self.kind} matrix quantised along axis {self.axis} can only be "
                               f"multiplied along that axis (transpose_b={transpose_b})")
        a = (a.T if transpose_a else a).float()
        lines = self.blocks.shape[0]
        out = torch.empty((a.shape[0], lines), dtype=torch.float32, device=self.blocks.device)
        step = max(1, TILE_BYTES // (4 * self.width))
        for start in range(0, lines, step):
            tile = dequantize(self.blocks[start:start + step], self.kind)
            torch.matmul(a, tile.T, out=out[:, start:start + step])
        return out


class TorchDeviceBlocks:
    """Backend mixin: quantised uploads stay :class:`TorchBlocks` on the device where
    ``device_blocks`` holds (a GPU, or ``CMATRIX_TORCH_BLOCKS=device``). Hooks it uses:
    ``torch_device``; everything else goes to the backend (``super()``)."""

    torch_device: torch.device

    @property
    def device_blocks(self) -> bool:
        if not hasattr(self, "_device_blocks"):  # decided once, at the first upload
            self._device_blocks = self.torch_device.type != "cpu" \
                or os.environ.get("CMATRIX_TORCH_BLOCKS") == "device"
        return self._device_blocks

    def upload(self, data: np.ndarray, dtype: str, quant: str | None = None, quant_axis: int = 0) -> Any:
        if quant is None or not self.device_blocks:
            return super().upload(data, dtype, quant, quant_axis)
        q.check_kind(quant)
        return TorchBlocks(QuantBlocks(to_float32(data, dtype), quant, quant_axis), self.torch_device)

    def download(self, x: Any, dtype: str) -> np.ndarray:
        if isinstance(x, TorchBlocks):
            return from_float32(x.values(), dtype)
        return super().download(x, dtype)

    def matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        if isinstance(b, TorchBlocks):
            return b.product(a, transpose_a, transpose_b)
        if isinstance(a, TorchBlocks):
            raise CMatrixError(f"a {a.kind} block can only be the weight b of a matmul")
        return super().matmul(a, b, transpose_a, transpose_b)

    def matmul_float32(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        if isinstance(b, TorchBlocks):
            return b.product(a, transpose_a, transpose_b)  # always float32
        return super().matmul_float32(a, b, transpose_a, transpose_b)

    def free(self, x: Any) -> None:
        if not isinstance(x, TorchBlocks):
            super().free(x)

    def stored_bytes(self, dtype: str, quant: str | None = None) -> float:
        if quant and self.device_blocks:
            return q.BLOCK_BYTES[quant] / q.BLOCK
        return super().stored_bytes(dtype, quant)
