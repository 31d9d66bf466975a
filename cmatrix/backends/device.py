"""What a rank's runtime talks to: its backend, plus the shape of every resident block.

Knowing shapes here keeps two chores out of every backend: empty blocks (a
rank with a zero share holds a 0-wide block, which OpenCL cannot even
allocate) never reach the backend, and a failing backend call is reported
with the operation, shapes and dtypes that caused it.

The node-side operations (``dev.rope(...)``, ...; declared and documented in
:mod:`.catalog`) are checked here before the backend sees them, with an
:class:`InputError` naming what is wrong. Their results are float32 blocks
(computed in float32; a caller rounds to its logical dtype when it downloads),
except transpose, which keeps the dtype.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.dtypes import STORAGE
from ..errors import CMatrixError, InputError
from .base import Backend
from .catalog import NODE_OPS


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

    def __getattr__(self, name: str) -> Any:
        if name in NODE_OPS:  # dev.rope(x, cos, sin, head_dim), ...
            return functools.partial(self.run_node_op, name)
        return getattr(self.backend, name)  # name, device, fallback, describe, supports, ...

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

    # Node-side operations: declared in .catalog, checked there, run by the backend ----------

    def run_node_op(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Node op ``name`` (see :mod:`.catalog`) on Blocks: a Block, or a host vector."""
        op = NODE_OPS[name]
        blocks = args[: op.blocks]
        call = op.check(*args, **kwargs)
        if blocks[0].empty:  # a rank holding nothing of this operand
            return call.identity if op.returns == "vector" else Block(None, call.shape, call.dtype)
        with self._explained(call.what):
            out = self.backend.run_node_op(op, [b.handle for b in blocks], call.params)
        if op.returns == "block":
            return Block(out, call.shape, call.dtype)
        out = np.asarray(out, dtype=np.float32)
        if out.shape != call.shape:
            raise CMatrixError(f"{self.backend.name} {name} returned shape {out.shape}, "
                               f"expected {call.shape}")
        return out
