"""The interface every compute backend implements. Backends never see MPI.

A backend owns the device memory of one rank: it uploads blocks (which then
stay resident), computes on resident blocks, and downloads results as numpy
storage of a logical dtype (see :mod:`cmatrix.dtypes`).

Quantised weights (``q8_0``/``q4_0``, see :mod:`cmatrix.quant`) are rounded
on upload. A backend with quantised kernels (ggml) stores the blocks; every
other backend stores their dequantised float32 values, so all ranks compute
with the same numbers whatever their backend.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .. import quant as q
from ..dtypes import SUPPORTED, to_float32
from . import host_ops

#: node-side operations (dense operands only; see :mod:`cmatrix.backends.host_ops`)
NODE_OPS = ("activation", "row_reduce", "softmax_finish", "rms_finish", "rope", "repeat_kv",
            "attention", "transpose")
OPS = ("matmul", "add", "sub", *NODE_OPS)


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

    # Node-side operations. The defaults run on the host: the block comes down as
    # float32, a numpy float32 kernel (cmatrix.backends.host_ops) computes, and the result
    # goes back up as float32. Backends with device kernels override them. Every 2-D
    # block here is non-empty (the Device layer keeps empty blocks away), vectors are
    # float32 numpy arrays, and a reduction along ``axis`` gives (and a per-slice vector
    # has) one value per slice along the other axis, broadcast along ``axis``.

    def _down32(self, x: Any) -> np.ndarray:
        """Resident ``x`` as float32 on the host (read only: it may be the resident array)."""
        return self.download(x, "float32")

    def _up32(self, values: np.ndarray) -> Any:
        """Host float32 ``values`` made resident."""
        return self.upload_dense(np.ascontiguousarray(values, dtype=np.float32), "float32")

    def activation(self, x: Any, kind: str) -> Any:
        """``kind`` ("silu", "gelu" (exact, erf), "gelu_tanh") of ``x``, computed in float32."""
        return self._up32(host_ops.activation(self._down32(x), kind))

    def row_reduce(self, x: Any, kind: str, axis: int, shift: np.ndarray | None = None) -> np.ndarray:
        """Reduce ``x`` along ``axis`` to a float32 host vector of length ``x.shape[1 - axis]``.

        ``kind``: "max"; "sumexp", the sum of exp(x - shift) (``shift`` one value per slice,
        None for 0; a -inf shift counts as 0 so an all -inf slice sums to 0, not NaN);
        "sumsq", the sum of squares (accumulated in at least float32).
        """
        return host_ops.row_reduce(self._down32(x), kind, axis, shift)

    def softmax_finish(self, x: Any, shift: np.ndarray, total: np.ndarray, axis: int) -> Any:
        """exp(x - shift) / total along ``axis`` (the last step of a softmax split across ranks);
        a slice whose ``total`` is 0 (all -inf) gives zeros."""
        return self._up32(host_ops.softmax_finish(self._down32(x), shift, total, axis))

    def rms_finish(self, x: Any, mean_square: np.ndarray, weight: np.ndarray | None, eps: float,
                   axis: int) -> Any:
        """x / sqrt(mean_square + eps) * weight: RMSNorm along ``axis``; ``weight`` (length
        ``x.shape[axis]``) is broadcast across the slices, None for no scaling."""
        return self._up32(host_ops.rms_finish(self._down32(x), mean_square, weight, eps, axis))

    def rope(self, x: Any, cos: np.ndarray, sin: np.ndarray, head_dim: int,
             interleaved: bool = False) -> Any:
        """Rotary position embedding of whole heads side by side in ``x`` (rows, heads * head_dim);
        ``cos``/``sin`` are (rows, head_dim // 2). Pairs are (i, i + head_dim/2) (Hugging Face
        rotate_half) or, ``interleaved``, (2i, 2i + 1) (GPT-J / Meta)."""
        return self._up32(host_ops.rope(self._down32(x), cos, sin, head_dim, interleaved))

    def repeat_kv(self, x: Any, head_dim: int, n_rep: int) -> Any:
        """(rows, kv * head_dim) -> (rows, kv * n_rep * head_dim), each head repeated n_rep times
        in place (output head h is input head h // n_rep, as Hugging Face ``repeat_kv``)."""
        return self._up32(host_ops.repeat_kv(self._down32(x), head_dim, n_rep))

    def attention(self, q: Any, k: Any, v: Any, head_dim: int, scale: float,
                  mask: np.ndarray | None = None, causal: bool = False) -> Any:
        """Scaled dot-product attention of q (Sq, H * head_dim) over k, v (Sk, Hkv * head_dim);
        query head h uses kv head h // (H // Hkv).

        scores = q_h k^T * scale (+ ``mask``, a float32 (Sq, Sk) host array that may hold
        -inf); ``causal`` lets query i see keys j <= i + (Sk - Sq) (bottom-right aligned, as
        decoding with a KV cache). Softmax in float32. A query row that sees no key at all
        gives zeros, not NaN. Result (Sq, H * head_dim).
        """
        q32, k32, v32 = self._down32(q), self._down32(k), self._down32(v)
        return self._up32(host_ops.attention(q32, k32, v32, head_dim, scale, mask, causal))

    def transpose(self, x: Any) -> Any:
        """A resident, contiguous transposed copy of ``x`` (its values exactly)."""
        return self._up32(host_ops.transpose(self._down32(x)))

    def supports(self, op: str, dtype: str, shape: tuple[int, ...]) -> bool:
        """Whether this backend can run ``op`` on an operand of ``dtype`` and ``shape``.

        ``dtype`` is a dense dtype or a quantisation (``q8_0``/``q4_0``); for a
        quantisation ``shape[-1]`` is the length of a row of blocks.
        """
        if op not in OPS:
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

    def describe(self) -> dict[str, Any]:
        """Device facts for the rank table."""
        return {"device": self.device, "fallback": self.fallback, "memory": self.memory(),
                "dtypes": list(self.dtypes)}
