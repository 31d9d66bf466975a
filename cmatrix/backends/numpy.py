"""numpy/BLAS backend: the reference every other backend is checked against.

numpy has no half-precision BLAS, so float16 and bfloat16 blocks are widened
to float32 once, on upload, and every product runs in float32 BLAS. Quantised
blocks stay blocks (see :mod:`.host_quant`).
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from ..core.arrays import aligned
from ..core.dtypes import from_float32, to_float32
from .base import Backend
from .host_quant import HostBlocks


class NumpyDense(Backend):
    """numpy's dense blocks (float32 arrays)."""

    name = "numpy"

    def __init__(self, device_index: int = 0, threads: int = 1, accel: bool = True) -> None:
        super().__init__(device_index, threads, accel)
        # Held for the life of the backend: BLAS threads stay limited on this rank.
        self._limits = threadpool_limits(limits=threads, user_api="blas")
        self.device = "cpu (BLAS)" if accel else "cpu"

    def stored_bytes(self, dtype: str, quant: str | None = None) -> float:
        return 4.0  # float32 arrays

    def upload_dense(self, data: np.ndarray, dtype: str) -> np.ndarray:
        # aligned: the LLM decoder's ggml graphs multiply these arrays where they lie
        return aligned(to_float32(data, dtype))

    def download(self, x: np.ndarray, dtype: str) -> np.ndarray:
        return from_float32(x, dtype)

    def matmul(self, a, b, transpose_a=False, transpose_b=False) -> np.ndarray:
        return np.matmul(a.T if transpose_a else a, b.T if transpose_b else b)

    def add(self, a, b) -> np.ndarray:
        return np.add(a, b)

    def sub(self, a, b) -> np.ndarray:
        return np.subtract(a, b)


class NumpyBackend(HostBlocks, NumpyDense):
    """The numpy backend: dense blocks as float32 arrays, quantised ones as blocks."""
