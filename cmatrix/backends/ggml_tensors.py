"""ggml tensors that hold a rank's data, for the ggml backend (:mod:`.ggml`) and the
LLM decoder's ggml graphs: resident tensors in buffers of their own (on 2 MiB pages,
q4_0 in the CPU's repacked layout where it has one), and host arrays of another
backend borrowed as ggml tensors without a copy. Importing it quiets ggml's log
below warnings (it writes a line per repacked tensor)."""

from __future__ import annotations

import ctypes
import sys
import weakref
from typing import Any

import ggml
import numpy as np

from ..core import quant as q
from ..errors import CMatrixError


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


def repack_buffer_type(backend):
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


class Resident:
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


def _exact(name: str, restype, argtypes: list):
    """A fresh ctypes function for ``name`` from ggml's libraries, with our own types: some of
    ggml-python's bindings return pointers through a NewType ctypes reads as a C int."""
    for library in getattr(ggml.lib, "_libraries", []):
        try:
            fn = library[name]
        except AttributeError:
            continue
        fn.restype, fn.argtypes = restype, argtypes
        return fn
    return None


_BUFFER_FROM_PTR = _exact("ggml_backend_cpu_buffer_from_ptr", ctypes.c_void_p,
                          [ctypes.c_void_p, ctypes.c_size_t])


class Borrowed:
    """A C-contiguous 2-D host array of ``rows`` lines seen as a ggml tensor without a copy:
    another backend's resident weight, multiplied by ggml's CPU kernels. float32 by default
    (ne0 = k columns); with ``gtype`` and ``ne0``, lines of that ggml type (e.g. q8_0/q4_0
    blocks, as bytes) of ``ne0`` values each. The array is kept
    alive with the tensor; ggml never frees its memory."""

    ALIGNMENT = 32  # ggml's TENSOR_ALIGNMENT: a CPU buffer from a pointer must start on it

    def __init__(self, array: np.ndarray, gtype: int | None = None, ne0: int | None = None) -> None:
        if gtype is None and array.dtype != np.float32 or array.ndim != 2 or not array.flags.c_contiguous:
            raise CMatrixError(f"ggml borrows C-contiguous 2-D float32 arrays, got {array.dtype} "
                               f"{array.shape}")
        gtype = ggml.GGML_TYPE_F32 if gtype is None else gtype
        ne0 = array.shape[1] if ne0 is None else ne0
        if ggml.ggml_row_size(gtype, ne0) * array.shape[0] != array.nbytes:
            raise CMatrixError(f"{array.nbytes} bytes are not {array.shape[0]} lines of {ne0} values "
                               f"of ggml type {gtype}")
        if array.ctypes.data % self.ALIGNMENT:
            raise CMatrixError("this array does not start on a 32-byte boundary")
        if _BUFFER_FROM_PTR is None:
            raise CMatrixError("this ggml build cannot wrap host memory")
        self.array = array
        ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=ggml.ggml_tensor_overhead(), mem_buffer=None,
                                                   no_alloc=True))
        if not ctx:
            raise CMatrixError("ggml_init failed for a borrowed tensor")
        self.tensor = ggml.ggml_new_tensor_2d(ctx, gtype, ne0, array.shape[0])
        buf = _BUFFER_FROM_PTR(array.ctypes.data, array.nbytes)
        self._finalizer = weakref.finalize(self, _release, ctx, buf)
        if not buf or ggml.ggml_backend_tensor_alloc(buf, self.tensor, array.ctypes.data) != \
                ggml.GGML_STATUS_SUCCESS:
            self._finalizer()
            raise CMatrixError("ggml could not wrap a host array")

    @classmethod
    def fits(cls, array: np.ndarray, any_type: bool = False) -> bool:
        """Whether :class:`Borrowed` can take float32 ``array`` (with ``any_type``: lines of any
        type) as it is."""
        return (_BUFFER_FROM_PTR is not None and (any_type or array.dtype == np.float32) and array.ndim == 2
                and array.flags.c_contiguous and array.size > 0 and array.ctypes.data % cls.ALIGNMENT == 0)
