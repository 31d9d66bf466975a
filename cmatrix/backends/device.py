"""What a rank's runtime talks to: its backend, plus the shape of every resident block.

Knowing shapes here keeps two chores out of every backend: empty blocks (a
rank with a zero share holds a 0-wide block, which OpenCL cannot even
allocate) never reach the backend, and a failing backend call is reported
with the operation, shapes and dtypes that caused it.

The node-side operations (activation, row_reduce, softmax_finish, rms_finish,
rope, repeat_kv, attention, transpose; semantics in :class:`Backend`) also check
their operands' shapes here, with an :class:`InputError` naming what is wrong.
Their results are float32 blocks (computed in float32; a caller rounds to its
logical dtype when it downloads), except transpose, which keeps the dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import STORAGE
from ..errors import CMatrixError, InputError
from .base import Backend
from .host_ops import ACTIVATIONS, REDUCTIONS


@dataclass
class Block:
    """A resident block: the backend's handle (None when empty) and its shape."""

    handle: Any
    shape: tuple[int, ...]
    dtype: str
    quant: str | None = None

    @property
    def empty(self) -> bool:
        return self.handle is None


class Device:
    """A backend behind shape bookkeeping; every handle it returns is a :class:`Block`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:  # name, device, fallback, describe, supports, ...
        return getattr(self.backend, name)

    @contextmanager
    def _explained(self, what: str):
        try:
            yield
        except (CMatrixError, MemoryError):
            raise
        except Exception as exc:
            raise CMatrixError(f"{self.backend.name} ({self.backend.device}) failed in {what}: "
                               f"{type(exc).__name__}: {exc}") from exc

    def upload(self, data: np.ndarray, dtype: str, quant: str | None = None,
               quant_axis: int = 0) -> Block:
        if data.size == 0:
            return Block(None, data.shape, dtype, quant)
        with self._explained(f"upload of {quant or dtype} {data.shape}"):
            handle = self.backend.upload(data, dtype, quant, quant_axis)
        return Block(handle, data.shape, "float32" if quant else dtype, quant)

    def download(self, x: Block, dtype: str) -> np.ndarray:
        if x.empty:
            return np.zeros(x.shape, dtype=STORAGE[dtype])
        with self._explained(f"download of {x.dtype} {x.shape} as {dtype}"):
            return self.backend.download(x.handle, dtype)

    def matmul(self, a: Block, b: Block, transpose_a: bool = False, transpose_b: bool = False,
               partial: bool = False) -> Block:
        """op(a) @ op(b); a ``partial`` product (summed across ranks later) stays float32."""
        m, k = a.shape[::-1] if transpose_a else a.shape
        k_b, n = b.shape[::-1] if transpose_b else b.shape
        if k != k_b:
            raise InputError(f"matmul: inner dimensions differ on this rank: {a.shape} "
                             f"(transpose_a={transpose_a}) and {b.shape} (transpose_b={transpose_b})")
        if m * n == 0:
            return Block(None, (m, n), "float32")
        if a.empty or b.empty:  # nothing to contract over: the product is zero
            return self.upload(np.zeros((m, n), dtype=np.float32), "float32")
        what = f"matmul of {a.dtype} {a.shape} and {b.quant or b.dtype} {b.shape} " \
               f"(transpose_a={transpose_a}, transpose_b={transpose_b})"
        with self._explained(what):
            fn = self.backend.matmul_float32 if partial else self.backend.matmul
            y = fn(a.handle, b.handle, transpose_a, transpose_b)
        return Block(y, (m, n), "float32" if partial or a.dtype != b.dtype else a.dtype)

    def _elementwise(self, kind: str, a: Block, b: Block) -> Block:
        if a.shape != b.shape:
            raise InputError(f"{kind}: block shapes differ on this rank: {a.shape} and {b.shape}")
        dtype = a.dtype if a.dtype == b.dtype else "float32"
        if a.empty:
            return Block(None, a.shape, dtype)
        with self._explained(f"{kind} of {a.dtype} and {b.dtype} {a.shape}"):
            fn = self.backend.add if kind == "add" else self.backend.sub
            return Block(fn(a.handle, b.handle), a.shape, dtype)

    def add(self, a: Block, b: Block) -> Block:
        return self._elementwise("add", a, b)

    def sub(self, a: Block, b: Block) -> Block:
        return self._elementwise("sub", a, b)

    def free(self, x: Block) -> None:
        if not x.empty:
            self.backend.free(x.handle)

    # Node-side operations ----------------------------------------------------------------

    @staticmethod
    def _matrix(op: str, name: str, x: Block) -> tuple[int, int]:
        if len(x.shape) != 2:
            raise InputError(f"{op}: {name} must be a 2-D block, got shape {x.shape}")
        return x.shape[0], x.shape[1]

    @staticmethod
    def _axis(op: str, axis: int) -> int:
        if isinstance(axis, bool) or axis not in (0, 1):
            raise InputError(f"{op}: axis must be 0 or 1, got {axis!r}")
        return int(axis)

    @staticmethod
    def _vector(op: str, name: str, values: np.ndarray, n: int) -> np.ndarray:
        arr = np.asarray(values)
        if arr.shape != (n,):
            raise InputError(f"{op}: {name} must be a vector of length {n}, got shape {arr.shape}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    @staticmethod
    def _array(op: str, name: str, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        arr = np.asarray(values)
        if arr.shape != shape:
            raise InputError(f"{op}: {name} must have shape {shape}, got {arr.shape}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    @staticmethod
    def _heads(op: str, name: str, cols: int, head_dim: int) -> int:
        if isinstance(head_dim, bool) or int(head_dim) != head_dim or head_dim < 1:
            raise InputError(f"{op}: head_dim must be a positive integer, got {head_dim!r}")
        if cols % head_dim:
            raise InputError(f"{op}: {name} has {cols} columns, not a multiple of head_dim={head_dim} "
                             f"(blocks hold whole heads side by side)")
        return cols // head_dim

    def activation(self, x: Block, kind: str) -> Block:
        """``kind`` ("silu", "gelu", "gelu_tanh") of ``x``, element-wise."""
        if kind not in ACTIVATIONS:
            raise InputError(f"activation: unknown kind {kind!r}; one of {', '.join(ACTIVATIONS)}")
        self._matrix("activation", "x", x)
        if x.empty:
            return Block(None, x.shape, "float32")
        with self._explained(f"activation {kind} of {x.dtype} {x.shape}"):
            return Block(self.backend.activation(x.handle, kind), x.shape, "float32")

    def row_reduce(self, x: Block, kind: str, axis: int, shift: np.ndarray | None = None) -> np.ndarray:
        """``x`` reduced along ``axis`` ("max", "sumexp" with ``shift``, "sumsq") to a float32
        host vector of length ``x.shape[1 - axis]``; an empty block gives the identity
        (-inf for max, 0 for the sums), ready to be combined across ranks."""
        if kind not in REDUCTIONS:
            raise InputError(f"row_reduce: unknown kind {kind!r}; one of {', '.join(REDUCTIONS)}")
        axis = self._axis("row_reduce", axis)
        self._matrix("row_reduce", "x", x)
        n = x.shape[1 - axis]
        if shift is not None:
            if kind != "sumexp":
                raise InputError(f"row_reduce: shift applies to sumexp only, not {kind}")
            shift = self._vector("row_reduce", "shift", shift, n)
        if x.empty:
            return np.full(n, -np.inf if kind == "max" else 0.0, dtype=np.float32)
        with self._explained(f"row_reduce {kind} along axis {axis} of {x.dtype} {x.shape}"):
            out = np.asarray(self.backend.row_reduce(x.handle, kind, axis, shift), dtype=np.float32)
        if out.shape != (n,):
            raise CMatrixError(f"{self.backend.name} row_reduce returned shape {out.shape}, expected {(n,)}")
        return out

    def softmax_finish(self, x: Block, shift: np.ndarray, total: np.ndarray, axis: int) -> Block:
        """exp(x - shift) / total, ``shift`` and ``total`` one value per slice along ``axis``."""
        axis = self._axis("softmax_finish", axis)
        self._matrix("softmax_finish", "x", x)
        n = x.shape[1 - axis]
        shift = self._vector("softmax_finish", "shift", shift, n)
        total = self._vector("softmax_finish", "total", total, n)
        if x.empty:
            return Block(None, x.shape, "float32")
        with self._explained(f"softmax_finish along axis {axis} of {x.dtype} {x.shape}"):
            return Block(self.backend.softmax_finish(x.handle, shift, total, axis), x.shape, "float32")

    def rms_finish(self, x: Block, mean_square: np.ndarray, weight: np.ndarray | None, eps: float,
                   axis: int) -> Block:
        """x / sqrt(mean_square + eps) * weight (RMSNorm along ``axis``; ``weight`` None: no scaling)."""
        axis = self._axis("rms_finish", axis)
        self._matrix("rms_finish", "x", x)
        mean_square = self._vector("rms_finish", "mean_square", mean_square, x.shape[1 - axis])
        if weight is not None:
            weight = self._vector("rms_finish", "weight", weight, x.shape[axis])
        if x.empty:
            return Block(None, x.shape, "float32")
        with self._explained(f"rms_finish along axis {axis} of {x.dtype} {x.shape}"):
            return Block(self.backend.rms_finish(x.handle, mean_square, weight, float(eps), axis),
                         x.shape, "float32")

    def rope(self, x: Block, cos: np.ndarray, sin: np.ndarray, head_dim: int,
             interleaved: bool = False) -> Block:
        """Rotary embedding of the heads in ``x``; ``cos``/``sin`` (rows, head_dim // 2)."""
        rows, cols = self._matrix("rope", "x", x)
        self._heads("rope", "x", cols, head_dim)
        if head_dim % 2:
            raise InputError(f"rope: head_dim must be even, got {head_dim}")
        cos = self._array("rope", "cos", cos, (rows, head_dim // 2))
        sin = self._array("rope", "sin", sin, (rows, head_dim // 2))
        if x.empty:
            return Block(None, x.shape, "float32")
        style = "interleaved" if interleaved else "rotate_half"
        with self._explained(f"rope ({style}, head_dim={head_dim}) of {x.dtype} {x.shape}"):
            return Block(self.backend.rope(x.handle, cos, sin, int(head_dim), bool(interleaved)),
                         x.shape, "float32")

    def repeat_kv(self, x: Block, head_dim: int, n_rep: int) -> Block:
        """(rows, kv * head_dim) -> (rows, kv * n_rep * head_dim), head h of the result = head h // n_rep."""
        rows, cols = self._matrix("repeat_kv", "x", x)
        self._heads("repeat_kv", "x", cols, head_dim)
        if isinstance(n_rep, bool) or int(n_rep) != n_rep or n_rep < 1:
            raise InputError(f"repeat_kv: n_rep must be a positive integer, got {n_rep!r}")
        shape = (rows, cols * int(n_rep))
        if x.empty:
            return Block(None, shape, "float32")
        with self._explained(f"repeat_kv (head_dim={head_dim}, n_rep={n_rep}) of {x.dtype} {x.shape}"):
            return Block(self.backend.repeat_kv(x.handle, int(head_dim), int(n_rep)), shape, "float32")

    def attention(self, q: Block, k: Block, v: Block, head_dim: int, scale: float,
                  mask: np.ndarray | None = None, causal: bool = False) -> Block:
        """softmax(q_h k_g^T * scale + mask) v_g per query head h (g = h // (H // Hkv)).

        A query row that sees no key (all masked) gives zeros. An empty ``q`` (a rank
        holding no heads) gives an empty result of q's shape; empty k/v with a non-empty
        q is an InputError.
        """
        sq, q_cols = self._matrix("attention", "q", q)
        sk, k_cols = self._matrix("attention", "k", k)
        self._matrix("attention", "v", v)
        n_heads = self._heads("attention", "q", q_cols, head_dim)
        n_kv = self._heads("attention", "k", k_cols, head_dim)
        if v.shape != k.shape:
            raise InputError(f"attention: v must have k's shape {k.shape}, got {v.shape}")
        if mask is not None:
            mask = self._array("attention", "mask", mask, (sq, sk))
        if q.empty:
            return Block(None, q.shape, "float32")
        if k.empty or v.empty:
            raise InputError(f"attention: k/v are empty ({k.shape}) but q {q.shape} is not: "
                             "every query needs keys and values")
        if n_heads % n_kv:
            raise InputError(f"attention: {n_heads} query heads cannot share {n_kv} kv heads "
                             "(the query heads must be a multiple of the kv heads)")
        what = (f"attention of q {q.dtype} {q.shape}, k/v {k.dtype} {k.shape} (head_dim={head_dim}, "
                f"mask={'yes' if mask is not None else 'no'}, causal={causal})")
        with self._explained(what):
            out = self.backend.attention(q.handle, k.handle, v.handle, int(head_dim), float(scale),
                                         mask, bool(causal))
        return Block(out, q.shape, "float32")

    def transpose(self, x: Block) -> Block:
        """A resident contiguous transposed copy; it keeps ``x``'s dtype (the values are exact)."""
        rows, cols = self._matrix("transpose", "x", x)
        if x.empty:
            return Block(None, (cols, rows), x.dtype)
        with self._explained(f"transpose of {x.dtype} {x.shape}"):
            return Block(self.backend.transpose(x.handle), (cols, rows), x.dtype)
