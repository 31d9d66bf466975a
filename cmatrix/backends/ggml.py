"""GGML backend (the seed's "llama" backend), through ggml-python's ctypes API.

Handles (:class:`GGMLHandle`) are lazy. An uploaded dense block keeps its host
storage until it is first used as the weight ``b`` of a matmul; then it is laid
out once, row-major along the contracted axis, as a ggml tensor of its own
type (F32/F16/BF16) in a backend buffer, and that tensor is cached per
orientation. Quantised uploads (``q8_0``/``q4_0``) go straight to a ggml tensor
of quantised blocks. Activations stay host arrays and travel into each graph
as float32 inputs.

Each operation builds a tiny graph in one persistent no-alloc metadata context
(reset per call); one persistent ``ggml_gallocr`` places its intermediate
tensors, so the compute buffer is reused between calls and grows only when a
graph needs more. Results are copied back to host float32 arrays.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import ggml
import numpy as np

from ..core import quant as q
from ..core.dtypes import STORAGE, from_float32, to_float32
from ..errors import CMatrixError
from .base import Backend

_GGML_TYPE = {"float32": ggml.GGML_TYPE_F32, "float16": ggml.GGML_TYPE_F16,
              "bfloat16": ggml.GGML_TYPE_BF16, "q8_0": ggml.GGML_TYPE_Q8_0, "q4_0": ggml.GGML_TYPE_Q4_0}
_GPU_TYPES = (ggml.GGML_BACKEND_DEVICE_TYPE_GPU, ggml.GGML_BACKEND_DEVICE_TYPE_IGPU)
_GRAPH_NODES = 8  # every graph here has at most 3 tensors


def _release(ctx, buf) -> None:
    """Free one resident tensor's buffer and context (weakref finaliser)."""
    if buf:
        ggml.ggml_backend_buffer_free(buf)
    if ctx:
        ggml.ggml_free(ctx)


def _keep_warnings(level: int, text: bytes, _user: Any) -> None:
    """ggml's log without its debug and info lines (one per repacked tensor, say)."""
    if level in (ggml.GGML_LOG_LEVEL_WARN, ggml.GGML_LOG_LEVEL_ERROR):
        sys.stderr.write(text.decode(errors="replace"))


_LOG = ggml.ggml_log_callback(_keep_warnings)
ggml.ggml_log_set(_LOG, None)


def _repack_buffer_type(backend):
    """The CPU backend's buffer type that stores q4_0 weights interleaved for its fast
    kernels (CPU_REPACK: 8 rows at a time with AVX2, as llama.cpp loads them), or None."""
    if not (ggml.ggml_backend_is_cpu(backend) and ggml.ggml_cpu_has_avx2()):
        return None
    dev = ggml.ggml_backend_get_device(backend)
    fn = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(dev),
                                                b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    i = 0
    while bufts and bufts[i]:
        if ggml.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _libc_madvise()
_MADV_HUGEPAGE, _HUGE = 14, 1 << 21


def _huge_pages(buf) -> None:
    """Ask Linux for 2 MiB pages under a weight buffer before it is written (best effort).

    Decoding streams every weight once per token; with 4 KiB pages each one costs a TLB
    miss, and a one-core matrix-vector product measured 15-35% faster on huge pages
    (numpy already asks for them for its large arrays; ggml's allocator does not)."""
    if _MADVISE is None:
        return
    base, size = ggml.ggml_backend_buffer_get_base(buf), ggml.ggml_backend_buffer_get_size(buf)
    if not base:
        return
    start, end = -(-base // _HUGE) * _HUGE, (base + size) // _HUGE * _HUGE
    if end > start:
        _MADVISE(start, end - start, _MADV_HUGEPAGE)


def _unrepack_q4_0(data: np.ndarray, rows: int, row_bytes: int) -> np.ndarray:
    """Plain q4_0 rows from CPU_REPACK's q4_0x8 layout: per 8 rows and block column, the 8
    scales, then the 8 rows' 16 code bytes interleaved 8 bytes at a time, xor 0x88."""
    nblocks = row_bytes // q.BLOCK_BYTES["q4_0"]
    packed = data.reshape(rows // 8, nblocks, 16 + 128)
    scales = packed[..., :16].reshape(rows // 8, nblocks, 8, 2)
    codes = (packed[..., 16:] ^ 0x88).reshape(rows // 8, nblocks, 2, 8, 8)  # chunk, row, byte
    codes = codes.transpose(0, 3, 1, 2, 4).reshape(rows // 8, 8, nblocks, 16)
    out = np.concatenate([scales.transpose(0, 2, 1, 3), codes], axis=3)  # (rows/8, 8, nblocks, 18)
    return np.ascontiguousarray(out).reshape(rows, row_bytes)


class _Resident:
    """One 2-D ggml tensor in its own context and backend buffer (of type ``buft`` if given)."""

    def __init__(self, backend, gtype: int, ne0: int, ne1: int, data: np.ndarray, buft=None) -> None:
        params = ggml.ggml_init_params(mem_size=ggml.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True)
        ctx = ggml.ggml_init(params)
        if not ctx:
            raise CMatrixError("ggml_init failed for a resident tensor")
        self.tensor = ggml.ggml_new_tensor_2d(ctx, gtype, ne0, ne1)
        self.repacked = buft is not None
        buf = (ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft) if self.repacked
               else ggml.ggml_backend_alloc_ctx_tensors(ctx, backend))
        self._finalizer = weakref.finalize(self, _release, ctx, buf)
        if not buf:
            self._finalizer()
            raise CMatrixError(f"ggml could not allocate {data.nbytes} bytes for a resident tensor")
        if ggml.ggml_backend_is_cpu(backend):
            _huge_pages(buf)
        self.nbytes = ggml.ggml_nbytes(self.tensor)
        if data.nbytes != self.nbytes:
            self._finalizer()
            raise CMatrixError(f"ggml tensor holds {self.nbytes} bytes, data has {data.nbytes}")
        data = np.ascontiguousarray(data)
        ggml.ggml_backend_tensor_set(self.tensor, data.ctypes.data, 0, self.nbytes)

    def get(self, dtype, shape) -> np.ndarray:
        """The tensor's bytes as a new host array of ``dtype`` and ``shape`` (repacked q4_0
        comes back in the plain layout: its buffer has no reader, but it is host memory)."""
        out = np.empty(shape, dtype=dtype)
        if self.repacked:
            raw = np.empty(self.nbytes, dtype=np.uint8)
            ctypes.memmove(raw.ctypes.data, self.tensor.contents.data, self.nbytes)
            rows = self.tensor.contents.ne[1]
            out.view(np.uint8).reshape(-1)[:] = _unrepack_q4_0(raw, rows, self.nbytes // rows).reshape(-1)
            return out
        ggml.ggml_backend_tensor_get(self.tensor, out.ctypes.data, 0, self.nbytes)
        return out

    def free(self) -> None:
        self._finalizer()


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
    weights: dict[bool, _Resident] = field(default_factory=dict)


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
            _repack_buffer_type(self._backend)
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
        rows = np.ascontiguousarray(values.T if quant_axis == 0 else values, dtype=np.float32)
        h = GGMLHandle(tuple(data.shape), "float32", quant=quant, quant_axis=quant_axis)
        if rows.size:
            # q4_0 in the CPU's repacked layout (whole groups of 8 rows): about 1.8x faster products
            buft = self._repack if quant == "q4_0" and rows.shape[0] % 8 == 0 else None
            h.weights[quant_axis == 1] = _Resident(self._live(), _GGML_TYPE[quant], rows.shape[1],
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
    def _weight(self, b: GGMLHandle, transpose_b: bool) -> _Resident:
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
            res = _Resident(self._live(), _GGML_TYPE[b.dtype], w.shape[1], w.shape[0], w)
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
