"""The interface every compute backend implements. Backends never see MPI.

A backend owns the device memory of one rank: it uploads blocks (which then
stay resident), computes on resident blocks, and downloads results as numpy
storage of a logical dtype (see :mod:`cmatrix.core.dtypes`).

Quantised weights (``q8_0``/``q4_0``, see :mod:`cmatrix.core.quant`) are rounded
on upload. A backend with quantised kernels (ggml) stores the blocks; every
other backend stores their dequantised float32 values, so all ranks compute
with the same numbers whatever their backend.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..core import quant as q
from ..core.dtypes import STORAGE, SUPPORTED, to_float32
from . import hostmem
from .catalog import DENSE_OPS, NODE_OPS, NodeOp


class Backend(ABC):
    """One rank's compute device.

    ``device_index`` is this rank's position among the ranks on its host that
    chose the same backend with ``accel`` on: they take accelerators 0, 1, ...
    in local-rank order. ``threads`` bounds the CPU threads the backend may
    use; ``accel=False`` asks for its plain CPU path.
    """

    name: str = "?"
    #: dense dtypes this backend computes with (all of cmatrix's by default)
    dtypes: tuple[str, ...] = SUPPORTED
    #: quantisations stored as blocks (others hold the dequantised float32 values)
    quantised: tuple[str, ...] = ()

    def __init__(self, device_index: int = 0, threads: int = 1, accel: bool = True) -> None:
        self.device_index = device_index
        self.threads = threads
        self.accel = accel
        self.device = "cpu"
        #: why this rank is not on an accelerator although it asked for one
        self.fallback: str | None = None

    def upload(self, data: np.ndarray, dtype: str, quant: str | None = None,
               quant_axis: int = 0) -> Any:
        """Make ``data`` (storage of logical ``dtype``) resident; return its handle.

        With ``quant``, the values are quantised in blocks of 32 along
        ``quant_axis`` (the axis a matmul will contract over).
        """
        if quant is None:
            return self.upload_dense(data, dtype)
        values = q.roundtrip(to_float32(data, dtype), quant, quant_axis)
        return self.upload_dense(values, "float32")

    @abstractmethod
    def upload_dense(self, data: np.ndarray, dtype: str) -> Any:
        """Make unquantised ``data`` of logical ``dtype`` resident; return its handle."""

    @abstractmethod
    def download(self, x: Any, dtype: str) -> np.ndarray:
        """Resident ``x`` -> C-contiguous numpy storage of logical ``dtype``."""

    @abstractmethod
    def matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        """op(a) @ op(b) on resident operands; the result stays resident.

        Operands may differ in dtype; a quantised operand is always ``b``.
        """

    def matmul_float32(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        """Like :meth:`matmul`, but never rounded to a narrower type than float32 (partial
        products that are summed across ranks). Backends whose products are always float32
        need not override it."""
        return self.matmul(a, b, transpose_a, transpose_b)

    @abstractmethod
    def add(self, a: Any, b: Any) -> Any:
        """a + b, shard-wise; the result stays resident."""

    @abstractmethod
    def sub(self, a: Any, b: Any) -> Any:
        """a - b, shard-wise; the result stays resident."""

    def free(self, x: Any) -> None:  # noqa: B027 - resident memory is GC'd by default
        """Release the device memory of ``x``."""

    # Node-side operations (declared in .catalog). A backend with a device kernel for one
    # defines a method of its name; the others run its numpy float32 host kernel: the
    # blocks come down as float32 and the result goes back up as float32. Every block
    # here is non-empty (the Device layer keeps empty blocks away).

    def _down32(self, x: Any) -> np.ndarray:
        """Resident ``x`` as float32 on the host (read only: it may be the resident array)."""
        return self.download(x, "float32")

    def _up32(self, values: np.ndarray) -> Any:
        """Host float32 ``values`` made resident."""
        return self.upload_dense(np.ascontiguousarray(values, dtype=np.float32), "float32")

    def run_node_op(self, op: NodeOp, handles: list[Any], params: tuple) -> Any:
        """Node op ``op`` on resident ``handles``: this backend's kernel, else the host's."""
        kernel = getattr(self, op.name, None)
        if kernel is not None:
            return kernel(*handles, *params)
        out = op.host(*(self._down32(h) for h in handles), *params)
        return self._up32(out) if op.returns == "block" else out

    def supports(self, op: str, dtype: str, shape: tuple[int, ...]) -> bool:
        """Whether this backend can run ``op`` on an operand of ``dtype`` and ``shape``.

        ``dtype`` is a dense dtype or a quantisation (``q8_0``/``q4_0``); for a
        quantisation ``shape[-1]`` is the length of a row of blocks.
        """
        if op not in DENSE_OPS and op not in NODE_OPS:
            return False
        if dtype in q.KINDS:
            return op == "matmul" and len(shape) >= 1 and shape[-1] % q.BLOCK == 0
        return dtype in self.dtypes

    def memory(self) -> int | None:
        """Bytes of memory on this rank's device (host RAM for CPU paths)."""
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None

    def memory_free(self) -> tuple[int | None, str]:
        """(bytes this rank can still place on its device, or None if unknown; the name of the
        pool it shares with other ranks of its host: "ram", a memory cgroup, a GPU)."""
        return hostmem.available()

    def stored_bytes(self, dtype: str, quant: str | None = None) -> float:
        """Bytes one weight value of ``dtype`` (or quantised ``quant``) takes once uploaded.
        By default a backend keeps dense dtypes as they are and quantised blocks as the
        float32 values they stand for."""
        return 4.0 if quant else float(STORAGE[dtype].itemsize)

    def memory_used(self) -> int | None:
        """Bytes of that memory this rank uses now (the process's resident set on CPU paths)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            import resource  # not on Linux: the peak is what there is (kilobytes; bytes on macOS)

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak if sys.platform == "darwin" else peak * 1024

    def describe(self) -> dict[str, Any]:
        """Device facts for the rank table."""
        return {"device": self.device, "fallback": self.fallback, "memory": self.memory(),
                "dtypes": list(self.dtypes)}
