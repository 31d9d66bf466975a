"""GGML backend (the seed's "llama" backend), through ggml-python's ctypes API.

Handles (:class:`GGMLHandle`) are lazy. An uploaded dense block keeps its host
storage until it is first used as the weight ``b`` of a matmul; then it is laid
out once, row-major along the contracted axis, as a ggml tensor of its own
type (F32/F16/BF16) in a backend buffer, and that tensor is cached per
orientation. Quantised uploads (``q8_0``/``q4_0``) go straight to a ggml tensor
of quantised blocks; on an AVX2 CPU, q4_0 in the repacked layout of ggml's fast
kernels (``CMATRIX_GGML_REPACK=0`` keeps the plain one). Weight buffers sit on
2 MiB pages where Linux allows (:mod:`.ggml_tensors`). Activations stay host
arrays and travel into each graph as float32 inputs.

Each operation builds a tiny graph in one persistent no-alloc metadata context
(reset per call); one persistent ``ggml_gallocr`` places its intermediate
tensors, so the compute buffer is reused between calls and grows only when a
graph needs more. Results are copied back to host float32 arrays.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import ggml
import numpy as np

from ..core import quant as q
from ..core.dtypes import STORAGE, from_float32, to_float32
from ..errors import CMatrixError
from .base import Backend
from .ggml_tensors import Borrowed, Resident, repack_buffer_type

__all__ = ["Borrowed", "GGMLBackend", "GGMLHandle"]

_GGML_TYPE = {"float32": ggml.GGML_TYPE_F32, "float16": ggml.GGML_TYPE_F16,
              "bfloat16": ggml.GGML_TYPE_BF16, "q8_0": ggml.GGML_TYPE_Q8_0, "q4_0": ggml.GGML_TYPE_Q4_0}
_GPU_TYPES = (ggml.GGML_BACKEND_DEVICE_TYPE_GPU, ggml.GGML_BACKEND_DEVICE_TYPE_IGPU)
_GRAPH_NODES = 8  # every graph here has at most 3 tensors


@dataclass(eq=False)
class GGMLHandle:
    """A block resident on a :class:`GGMLBackend`.

    ``host`` is the storage of logical ``dtype`` (``None`` once the block lives
    only in ggml tensors); ``weights`` maps ``transpose_b`` to the cached ggml
    tensor holding op(b) transposed, row-major along the contracted axis.
    """

    shape: tuple[int, ...]
    dtype: str
    host: np.ndarray | None = None
    quant: str | None = None
    quant_axis: int = 0
    weights: dict[bool, Resident] = field(default_factory=dict)


class GGMLBackend(Backend):
    """ggml compute on the CPU backend, or on a ggml GPU device where the build has one."""

    name = "ggml"
    quantised = q.KINDS

    def __init__(self, device_index: int = 0, threads: int = 1, accel: bool = True) -> None:
        super().__init__(device_index, threads, accel)
        self._backend = self._galloc = self._ctx = None
        if accel:
            gpus = [d for d in (ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count()))
                    if ggml.ggml_backend_dev_type(d) in _GPU_TYPES]
            if device_index < len(gpus):
                dev = gpus[device_index]
                self._backend = ggml.ggml_backend_dev_init(dev, None)
                self.device = f"ggml {ggml.ggml_backend_dev_name(dev).decode()}"
                if not self._backend:
                    self.fallback = f"ggml could not start {self.device}; using CPU"
            else:
                self.fallback = ("ggml build has no GPU backend; using CPU" if not gpus else
                                 f"ggml has {len(gpus)} GPU(s), none at index {device_index}; using CPU")
        if not self._backend:
            self._backend = ggml.ggml_backend_cpu_init()
            self.device = "ggml cpu"
        if not self._backend:
            raise CMatrixError("ggml could not start its backend")
        if ggml.ggml_backend_is_cpu(self._backend):
            ggml.ggml_backend_cpu_set_n_threads(self._backend, threads)
        self._repack = None if os.environ.get("CMATRIX_GGML_REPACK") == "0" else \
            repack_buffer_type(self._backend)
        # The CPU backend's default type is ggml_backend_cpu_buffer_type(), whose ggml-python binding
        # truncates the pointer to a C int (its restype is a NewType): ask the backend instead.
        self._galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(self._backend))
        mem = ggml.ggml_tensor_overhead() * _GRAPH_NODES + ggml.ggml_graph_overhead_custom(_GRAPH_NODES,
                                                                                            False)
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=mem, mem_buffer=None, no_alloc=True))
        if not (self._galloc and self._ctx):
            self.close()
            raise CMatrixError("ggml could not create its graph allocator")

    # -- memory ---------------------------------------------------------------------------------
    def stored_bytes(self, dtype: str, quant: str | None = None) -> float:
        if quant:  # 32 values in one block with its float16 scale
            return q.BLOCK_BYTES[quant] / q.BLOCK
        return float(STORAGE[dtype].itemsize)

    def upload(self, data: np.ndarray, dtype: str, quant: str | None = None,
               quant_axis: int = 0) -> GGMLHandle:
        """Make ``data`` resident; with ``quant``, as ggml blocks along ``quant_axis``."""
        if quant is None:
            return self.upload_dense(data, dtype)
        q.check_kind(quant)
        if data.ndim != 2 or quant_axis not in (0, 1):
            raise CMatrixError(f"quantised blocks need a 2-D matrix and axis 0 or 1, got {data.shape}")
        q.check_row_length(data.shape[quant_axis], quant)
        values = to_float32(data, dtype)
        rows = values.T if quant_axis == 0 else values  # quantize() takes any strides, a tile at a time
        h = GGMLHandle(tuple(data.shape), "float32", quant=quant, quant_axis=quant_axis)
        if rows.size:
            # q4_0 in the CPU's repacked layout (whole groups of 8 rows): about 1.8x faster products
            buft = self._repack if quant == "q4_0" and rows.shape[0] % 8 == 0 else None
            h.weights[quant_axis == 1] = Resident(self._live(), _GGML_TYPE[quant], rows.shape[1],
                                                   rows.shape[0], q.quantize(rows, quant), buft)
        return h

    def upload_dense(self, data: np.ndarray, dtype: str) -> GGMLHandle:
        """Keep unquantised ``data`` (storage of ``dtype``); ggml tensors are made on first use."""
        if dtype == "bfloat16" and data.dtype != STORAGE[dtype]:
            raise CMatrixError(f"bfloat16 blocks are stored as uint16 bits, got {data.dtype}")
        return GGMLHandle(tuple(data.shape), dtype, host=np.array(data, STORAGE[dtype], order="C", copy=True))

    def _host(self, h: GGMLHandle) -> np.ndarray:
        """Host storage of a dense handle, read back from a ggml tensor if need be."""
        if h.quant is not None:
            raise CMatrixError(f"a {h.quant} block can only be the weight b of a matmul")
        if h.host is None:
            if not h.weights:
                raise CMatrixError("this ggml handle was freed")
            tb, res = next(iter(h.weights.items()))  # the tensor holds op(b).T: b itself if tb
            w = res.get(STORAGE[h.dtype], h.shape if tb else h.shape[::-1])
            h.host = w if tb else np.ascontiguousarray(w.T)
        return h.host

    def download(self, x: GGMLHandle, dtype: str) -> np.ndarray:
        """``x`` as C-contiguous storage of ``dtype`` (quantised blocks come back dequantised)."""
        if x.quant is not None:
            if not x.weights:
                values = np.zeros(x.shape, np.float32)
            else:
                rows = x.shape[::-1] if x.quant_axis == 0 else x.shape
                res = x.weights[x.quant_axis == 1]
                blocks = res.get(np.uint8, (rows[0], rows[1] // q.BLOCK * q.BLOCK_BYTES[x.quant]))
                values = q.dequantize(blocks, x.quant)
                values = values.T if x.quant_axis == 0 else values
            return from_float32(values, dtype)
        host = self._host(x)
        if x.dtype == dtype:
            return np.array(host, order="C", copy=True)
        return from_float32(to_float32(host, x.dtype), dtype)

    def free(self, x: GGMLHandle) -> None:
        """Release the ggml tensors and host storage of ``x``."""
        for res in x.weights.values():
            res.free()
        x.weights.clear()
        x.host = None

    def close(self) -> None:
        """Free the graph context, allocator and ggml backend (idempotent)."""
        if getattr(self, "_ctx", None):
            ggml.ggml_free(self._ctx)
        if getattr(self, "_galloc", None):
            ggml.ggml_gallocr_free(self._galloc)
        if getattr(self, "_backend", None):
            ggml.ggml_backend_free(self._backend)
        self._ctx = self._galloc = self._backend = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn ggml down
            self.close()

    def _live(self):
        """The ggml backend, or a clear error once :meth:`close` ran (ggml would crash on NULL)."""
        if not self._backend:
            raise CMatrixError("this ggml backend was closed")
        return self._backend

    # -- for graphs built above the backend (the LLM decoder's ggml path) -----------------------
    @property
    def ggml_backend(self):
        """The ggml backend handle (``ggml_backend_t``) graphs run on."""
        return self._live()

    def weight_tensor(self, b: GGMLHandle, transpose_b: bool):
        """The resident ggml tensor of op(b).T (ne0 = the contracted width), laid out on first use."""
        return self._weight(b, transpose_b).tensor

    # -- compute --------------------------------------------------------------------------------
    def _weight(self, b: GGMLHandle, transpose_b: bool) -> Resident:
        """The cached ggml tensor of op(b).T for this orientation, laid out on first use."""
        if b.quant is not None:
            if transpose_b != (b.quant_axis == 1):
                raise CMatrixError(f"this {b.quant} weight was quantised along axis {b.quant_axis}: use it "
                                   f"as b with transpose_b={b.quant_axis == 1}")
            return b.weights[transpose_b]
        res = b.weights.get(transpose_b)
        if res is None:
            host = self._host(b)
            w = host if transpose_b else host.T  # op(b).T, shape (n, k)
            w = np.ascontiguousarray(w)
            res = Resident(self._live(), _GGML_TYPE[b.dtype], w.shape[1], w.shape[0], w)
            b.weights[transpose_b] = res
            b.host = None  # the ggml tensor is the resident copy now
        return res

    def _run(self, build, inputs: list[np.ndarray], shape: tuple[int, ...]) -> GGMLHandle:
        """Build a graph in the metadata context, allocate, feed float32 ``inputs``, compute."""
        self._live()
        ggml.ggml_reset(self._ctx)
        tensors = [ggml.ggml_new_tensor_1d(self._ctx, ggml.GGML_TYPE_F32, x.size) if x.ndim == 1 else
                   ggml.ggml_new_tensor_2d(self._ctx, ggml.GGML_TYPE_F32, x.shape[1], x.shape[0])
                   for x in inputs]
        for t in tensors:
            ggml.ggml_set_input(t)
        out = build(self._ctx, *tensors)
        ggml.ggml_set_output(out)
        graph = ggml.ggml_new_graph_custom(self._ctx, _GRAPH_NODES, False)
        ggml.ggml_build_forward_expand(graph, out)
        if not ggml.ggml_gallocr_alloc_graph(self._galloc, graph):
            raise CMatrixError("ggml could not allocate the compute buffer")
        for t, x in zip(tensors, inputs, strict=True):
            ggml.ggml_backend_tensor_set(t, x.ctypes.data, 0, x.nbytes)
        if ggml.ggml_backend_graph_compute(self._backend, graph) != ggml.GGML_STATUS_SUCCESS:
            raise CMatrixError("ggml graph compute failed")
        result = np.empty(shape, dtype=np.float32)
        ggml.ggml_backend_tensor_get(out, result.ctypes.data, 0, result.nbytes)
        return GGMLHandle(shape, "float32", host=result)

    def matmul(self, a: GGMLHandle, b: GGMLHandle, transpose_a: bool = False,
               transpose_b: bool = False) -> GGMLHandle:
        """op(a) @ op(b) as ``ggml_mul_mat(op(b).T, op(a))``; float32 result."""
        x = to_float32(self._host(a), a.dtype)
        x = np.ascontiguousarray(x.T if transpose_a else x, dtype=np.float32)  # (m, k)
        if len(b.shape) != 2 or x.ndim != 2:
            raise CMatrixError(f"matmul needs 2-D operands, got {a.shape} and {b.shape}")
        k2, n = b.shape[::-1] if transpose_b else b.shape
        m, k = x.shape
        if k != k2:
            raise CMatrixError(f"matmul shapes do not match: op(a) is {x.shape}, op(b) is {(k2, n)}")
        if b.quant is not None and transpose_b != (b.quant_axis == 1):
            self._weight(b, transpose_b)  # raises the orientation error
        if m * n * k == 0:
            return GGMLHandle((m, n), "float32", host=np.zeros((m, n), np.float32))
        w = self._weight(b, transpose_b).tensor
        return self._run(lambda ctx, xt: ggml.ggml_mul_mat(ctx, w, xt), [x], (m, n))

    def _elementwise(self, op, a: GGMLHandle, b: GGMLHandle) -> GGMLHandle:
        if a.shape != b.shape:
            raise CMatrixError(f"shapes differ: {a.shape} and {b.shape}")
        xa = np.ascontiguousarray(to_float32(self._host(a), a.dtype), dtype=np.float32).reshape(-1)
        xb = np.ascontiguousarray(to_float32(self._host(b), b.dtype), dtype=np.float32).reshape(-1)
        if xa.size == 0:
            return GGMLHandle(a.shape, "float32", host=np.zeros(a.shape, np.float32))
        h = self._run(op, [xa, xb], (xa.size,))
        h.host, h.shape = h.host.reshape(a.shape), a.shape
        return h

    def add(self, a: GGMLHandle, b: GGMLHandle) -> GGMLHandle:
        """a + b with ``ggml_add`` in float32."""
        return self._elementwise(ggml.ggml_add, a, b)

    def sub(self, a: GGMLHandle, b: GGMLHandle) -> GGMLHandle:
        """a - b with ``ggml_sub`` in float32."""
        return self._elementwise(ggml.ggml_sub, a, b)

    @property
    def compute_bytes(self) -> int:
        """Size of the graph allocator's compute buffer (it grows only when a graph needs more)."""
        return ggml.ggml_gallocr_get_buffer_size(self._galloc, 0) if self._live() else 0

    def describe(self) -> dict:
        """Device facts for the rank table, with the thread count."""
        return {**super().describe(), "threads": self.threads}
