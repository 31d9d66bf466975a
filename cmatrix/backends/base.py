"""The interface every compute backend implements. Backends never see MPI.

A backend owns the device memory of one rank: it uploads blocks (which then
stay resident), computes on resident blocks, and downloads results as numpy
storage of a logical dtype (see :mod:`cmatrix.dtypes`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Backend(ABC):
    """One rank's compute device.

    ``device_index`` is the rank's local rank on its host: ranks on one host
    take accelerators 0, 1, ... in order. ``threads`` bounds the CPU threads
    the backend may use; ``accel=False`` asks for its plain CPU path.
    """

    name: str = "?"

    def __init__(self, device_index: int = 0, threads: int = 1, accel: bool = True) -> None:
        self.device_index = device_index
        self.threads = threads
        self.accel = accel
        self.device = "cpu"
        #: why this rank is not on an accelerator, when it asked for one
        self.fallback: str | None = None

    @abstractmethod
    def upload(self, data: np.ndarray, dtype: str) -> Any:
        """Make ``data`` (storage of logical ``dtype``) resident; return its handle."""

    @abstractmethod
    def download(self, x: Any, dtype: str) -> np.ndarray:
        """Resident ``x`` -> C-contiguous numpy storage of logical ``dtype``."""

    @abstractmethod
    def matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        """op(a) @ op(b) on resident operands; the result stays resident."""

    @abstractmethod
    def add(self, a: Any, b: Any) -> Any:
        """a + b, shard-wise; the result stays resident."""

    @abstractmethod
    def sub(self, a: Any, b: Any) -> Any:
        """a - b, shard-wise; the result stays resident."""

    def free(self, x: Any) -> None:  # noqa: B027 - resident memory is GC'd by default
        """Release the device memory of ``x``."""

    def supports(self, op: str, dtype: str, shape: tuple[int, ...]) -> bool:
        """Whether this backend can run ``op`` on operands of ``dtype``/``shape``."""
        return op in ("matmul", "add", "sub") and dtype in ("float32", "float16", "bfloat16")

    def describe(self) -> dict[str, Any]:
        """Device facts for the rank table."""
        return {"device": self.device, "fallback": self.fallback}
