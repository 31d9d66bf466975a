"""OpenCL backend: cmatrix's own kernels (``kernels/*.cl``) on any OpenCL device.

Products run in a tiled GEMM kernel (local-memory tiles, register blocks,
transposes inside the kernel) or, for a single row or column, a GEMV kernel;
add/sub in an element-wise kernel. Operands keep their storage type on the
device (float16 read with ``vload_half`` or bit arithmetic, bfloat16 widened
by a shift); every result is float32 and is narrowed when downloaded.

With ``accel`` the rank takes the ``device_index``-th OpenCL GPU/accelerator
of the host; without one it falls back to an OpenCL CPU device (PoCL) and says
so in ``fallback``. PoCL's worker threads are limited to ``threads`` through
its environment, which it reads once, when the process first initialises it.
"""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pyopencl as cl

from ..core.dtypes import STORAGE, SUPPORTED, from_float32, to_float32
from ..errors import CMatrixError
from .base import Backend
from .opencl_quant import DeviceBlocks

KIND = {"float32": 0, "float16": 1, "bfloat16": 2}  # A_KIND / B_KIND in kernels/common.cl

# Blocking per device type (see kernels/gemm.cl); the CPU one was tuned on PoCL (AVX2).
CPU_TILES = {"TM": 192, "TN": 512, "TK": 128, "TX": 1, "TY": 1, "WM": 6, "WN": 16, "VW": 8,
             "GX": 1, "CN": 4096, "RB": 8, "UNR": 8, "XT": 512, "EW": 4096}
GPU_TILES = {"TM": 64, "TN": 64, "TK": 16, "TX": 16, "TY": 16, "WM": 4, "WN": 4, "VW": 4,
             "GX": 64, "CN": 4, "RB": 4, "UNR": 4, "XT": 512, "EW": 1}
SMALL_TILES = {**GPU_TILES, "TM": 32, "TN": 32, "TX": 8, "TY": 8, "GX": 32, "XT": 256}  # small devices
CPU_FLAGS = ("HALF_BITS", "PTR_VLOAD")  # inline float16 widening, plain vector loads
EW_GROUP = {True: 1, False: 256}  # element-wise work-group size, by "is a CPU"


def kernel_dir() -> Path:
    """The folder holding the ``.cl`` sources: ``cmatrix/kernels`` in an installed
    wheel, the checkout's top-level ``kernels/`` in an editable install."""
    packaged = resources.files("cmatrix") / "kernels"
    candidates = [Path(str(packaged)), Path(__file__).resolve().parents[2] / "kernels"]
    for folder in candidates:
        if (folder / "common.cl").is_file():
            return folder
    raise CMatrixError(f"OpenCL kernel sources not found (looked in {', '.join(map(str, candidates))}); "
                       "reinstall cmatrix")


def kernel_source(name: str, source: str | None = None) -> str:
    """The text compiled for kernel file ``name``: common.cl, then the file (or ``source``)."""
    folder = kernel_dir()
    body = source if source is not None else (folder / name).read_text()
    return f'{(folder / "common.cl").read_text()}\n#line 1 "{name}"\n{body}'


def build_program(context: cl.Context, name: str, options: str = "",
                  source: str | None = None) -> cl.Program:
    """Compile kernel file ``name`` (or ``source`` under that name) for ``context``.

    A failed build raises :class:`CMatrixError` naming the file and the options and
    carrying the compiler's log. pyopencl keeps built binaries in its on-disk cache.
    """
    program = cl.Program(context, kernel_source(name, source))
    try:
        return program.build(options=options)
    except cl.Error as exc:
        logs = []
        for device in context.devices:
            with contextlib.suppress(cl.Error):
                logs.append(program.get_build_info(device, cl.program_build_info.LOG).strip())
        log = "\n".join(entry for entry in logs if entry) or str(exc)
        raise CMatrixError(f"OpenCL build of kernels/{name} failed (options: {options or 'none'}):\n"
                           f"{log}") from exc


def _limit_cpu_threads(threads: int) -> None:
    # PoCL 3 reads POCL_MAX_PTHREAD_COUNT, later releases POCL_CPU_MAX_CU_COUNT; both are read
    # once, when the platform is first initialised in this process.
    for var in ("POCL_MAX_PTHREAD_COUNT", "POCL_CPU_MAX_CU_COUNT"):
        os.environ[var] = str(max(1, int(threads)))


def _devices() -> tuple[list[cl.Device], list[cl.Device]]:
    """(GPUs and accelerators, CPUs) over every OpenCL platform, in platform order."""
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        platforms = []
    accels, cpus = [], []
    for platform in platforms:
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue
        for device in devices:
            if device.type & (cl.device_type.GPU | cl.device_type.ACCELERATOR):
                accels.append(device)
            elif device.type & cl.device_type.CPU:
                cpus.append(device)
    return accels, cpus


def _describe(device: cl.Device) -> str:
    platform = device.platform.name.strip()
    platform = "PoCL" if platform == "Portable Computing Language" else platform
    text = f"opencl:{device.name.strip()} ({platform}"
    if device.type & cl.device_type.CPU:
        units = device.max_compute_units
        text += f", {units} thread{'s' if units != 1 else ''}"
    return text + ")"


class CLArray:
    """A block resident in an OpenCL buffer: the buffer, its shape and logical dtype."""

    __slots__ = ("buffer", "shape", "dtype")

    def __init__(self, buffer: cl.Buffer, shape: tuple[int, ...], dtype: str) -> None:
        self.buffer, self.shape, self.dtype = buffer, tuple(shape), dtype

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    def __repr__(self) -> str:
        return f"CLArray({self.shape}, {self.dtype})"


class OpenCLDense(Backend):
    """One rank's OpenCL device with dense blocks; see the module docstring for device choice."""

    name = "opencl"
    dtypes = SUPPORTED  # float16 without cl_khr_fp16 (vload_half), bfloat16 by shifts

    def __init__(self, device_index: int = 0, threads: int = 1, accel: bool = True) -> None:
        super().__init__(device_index, threads, accel)
        _limit_cpu_threads(threads)
        accels, cpus = _devices()
        if accel and len(accels) > device_index:
            device = accels[device_index]
        elif cpus:
            device = cpus[0]
            if accel:
                self.fallback = (f"only {len(accels)} OpenCL GPU(s) for device index {device_index}"
                                 if accels else "no OpenCL GPU or accelerator found")
        else:
            raise CMatrixError("no OpenCL CPU device here" + ("" if accels else " and no GPU") +
                               "; install one with: pip install pocl-binary-distribution")
        self._device = device
        self.device = _describe(device)
        self.is_cpu = bool(device.type & cl.device_type.CPU)
        self.context = cl.Context([device])
        self.queue = cl.CommandQueue(self.context)
        self.tiles = dict(_fit(CPU_TILES if self.is_cpu else GPU_TILES, device))
        self.flags = CPU_FLAGS if self.is_cpu else ()
        self._programs: dict[tuple[str, str], cl.Program] = {}
        self._kernels: dict[tuple[str, str, str], cl.Kernel] = {}

    def memory(self) -> int | None:
        """Global memory of the OpenCL device in bytes."""
        return int(self._device.global_mem_size)

    def memory_free(self) -> tuple[int | None, str]:
        if self.is_cpu:  # PoCL and other CPU devices allocate from host memory
            return super().memory_free()
        # OpenCL tells no free memory: its size; one pool per device this host's ranks use
        return self.memory(), f"{self.device} #{self.device_index}"

    # -- programs -----------------------------------------------------------------
    def build(self, name: str, options: str = "", source: str | None = None) -> cl.Program:
        """Kernel file ``name`` built with ``options``, once per backend (cached); a given
        ``source`` replaces the file's text and is built afresh (tests, experiments)."""
        key = (name, options)
        if source is not None:
            return build_program(self.context, name, options, source)
        if key not in self._programs:
            self._programs[key] = build_program(self.context, name, options)
        return self._programs[key]

    def _kernel(self, name: str, kernel: str, a_dtype: str, b_dtype: str) -> cl.Kernel:
        macros = {"A_KIND": KIND[a_dtype], "B_KIND": KIND[b_dtype], **self.tiles}
        options = " ".join([f"-D{k}={v}" for k, v in macros.items()] + [f"-D{f}" for f in self.flags])
        key = (name, kernel, options)
        if key not in self._kernels:
            self._kernels[key] = cl.Kernel(self.build(name, options), kernel)
        return self._kernels[key]

    def _run(self, kernel: cl.Kernel, global_size, local_size, *args) -> None:
        kernel.set_args(*args)
        cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, local_size)

    def _empty(self, shape: tuple[int, ...]) -> CLArray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * 4
        return CLArray(cl.Buffer(self.context, cl.mem_flags.READ_WRITE, max(nbytes, 1)), shape, "float32")

    # -- memory ---------------------------------------------------------------------
    def upload_dense(self, data: np.ndarray, dtype: str) -> CLArray:
        """Copy host storage of logical ``dtype`` into a new device buffer."""
        host = np.ascontiguousarray(data, dtype=STORAGE[dtype])
        flags = cl.mem_flags.READ_WRITE
        if host.nbytes:
            buffer = cl.Buffer(self.context, flags | cl.mem_flags.COPY_HOST_PTR, hostbuf=host)
        else:
            buffer = cl.Buffer(self.context, flags, 1)
        return CLArray(buffer, host.shape, dtype)

    def download(self, x: CLArray, dtype: str) -> np.ndarray:
        """Device block -> C-contiguous host storage of ``dtype`` (narrowed on the host,
        nearest-even like :func:`cmatrix.core.dtypes.from_float32`)."""
        host = np.empty(x.shape, dtype=STORAGE[x.dtype])
        if host.nbytes:
            cl.enqueue_copy(self.queue, host, x.buffer, is_blocking=True)
        if dtype == x.dtype:
            return host
        return from_float32(to_float32(host, x.dtype), dtype)

    def free(self, x: CLArray) -> None:
        """Release the device buffer of ``x`` now (queued work that uses it still finishes)."""
        if x.buffer is not None:
            x.buffer.release()
            x.buffer = None

    # -- compute --------------------------------------------------------------------
    def matmul(self, a: CLArray, b: CLArray, transpose_a: bool = False,
               transpose_b: bool = False) -> CLArray:
        """op(a) @ op(b) in float32 on the device: GEMV for one row or column, else GEMM."""
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise CMatrixError(f"opencl matmul takes 2-D blocks, got {a.shape} and {b.shape}")
        m, k = a.shape[::-1] if transpose_a else a.shape
        k_b, n = b.shape[::-1] if transpose_b else b.shape
        if k != k_b:
            raise CMatrixError(f"matmul: inner dimensions differ: op(a) is {m}x{k}, op(b) is {k_b}x{n}")
        out = self._empty((m, n))
        if m * n == 0:
            return out
        t = self.tiles
        if m == 1 or n == 1:
            # A row vector times op(b); a column is the same product with the roles swapped:
            # (op(a) @ b)^T = b^T @ op(a)^T, and a 1 x n or m x 1 result has one layout.
            x, mat, rows_first = (a, b, transpose_b) if m == 1 else (b, a, not transpose_a)
            width = n if m == 1 else m
            if rows_first:  # mat stored width x k: one dot product per row
                kernel = self._kernel("gemm.cl", "gemv_t", x.dtype, mat.dtype)
                groups = -(-width // t["RB"])
                self._run(kernel, (groups * t["GX"],), (t["GX"],), np.int32(width), np.int32(k),
                          x.buffer, mat.buffer, out.buffer)
            else:  # mat stored k x width: sweep its rows
                strip = t["CN"]
                if t["GX"] == 1:  # a CPU: one long stretch per thread, stretches of equal length
                    strip = _round_up(-(-width // max(self._workers(), -(-width // t["CN"]))), 8)
                kernel = self._kernel("gemm.cl", "gemv_n", x.dtype, mat.dtype)
                groups = -(-width // (t["GX"] * strip))
                self._run(kernel, (groups * t["GX"],), (t["GX"],), np.int32(width), np.int32(k),
                          np.int32(strip), x.buffer, mat.buffer, out.buffer)
            return out
        name = f"gemm_{'t' if transpose_a else 'n'}{'t' if transpose_b else 'n'}"
        kernel = self._kernel("gemm.cl", name, a.dtype, b.dtype)
        size = (-(-n // t["TN"]) * t["TX"], -(-m // t["TM"]) * t["TY"])
        self._run(kernel, size, (t["TX"], t["TY"]), np.int32(m), np.int32(n), np.int32(k),
                  a.buffer, b.buffer, out.buffer)
        return out

    def add(self, a: CLArray, b: CLArray) -> CLArray:
        """a + b element-wise in float32 on the device."""
        return self._elementwise("ew_add", a, b)

    def sub(self, a: CLArray, b: CLArray) -> CLArray:
        """a - b element-wise in float32 on the device."""
        return self._elementwise("ew_sub", a, b)

    def _elementwise(self, kernel_name: str, a: CLArray, b: CLArray) -> CLArray:
        if a.shape != b.shape:
            raise CMatrixError(f"{kernel_name[3:]}: shapes differ: {a.shape} and {b.shape}")
        out = self._empty(a.shape)
        if out.size:
            kernel = self._kernel("elementwise.cl", kernel_name, a.dtype, b.dtype)
            group = min(EW_GROUP[self.is_cpu], self._device.max_work_group_size)
            items = _round_up(-(-out.size // self.tiles["EW"]), group)
            self._run(kernel, (items,), (group,), np.int64(out.size), a.buffer, b.buffer, out.buffer)
        return out

    def _workers(self) -> int:
        return max(1, int(self._device.max_compute_units)) if self.is_cpu else 1



class OpenCLBackend(DeviceBlocks, OpenCLDense):
    """The OpenCL backend: dense blocks in their storage type, quantised ones as blocks (see
    :mod:`.opencl_quant`), both multiplied by cmatrix's kernels on the device."""


def _fit(tiles: dict[str, int], device: cl.Device) -> dict[str, int]:
    """``tiles``, or the small blocking where ``device`` lacks the local memory or group size."""
    t = tiles
    c_tile = t["TM"] * t["TN"] if t["TM"] * t["TN"] > t["TX"] * t["TY"] * t["WM"] * t["WN"] else 0
    local = 4 * max(t["TK"] * (t["TM"] + t["TN"]) + c_tile, t["XT"] + t["GX"] * t["RB"])
    fits = local <= device.local_mem_size and max(t["TX"] * t["TY"], t["GX"]) <= device.max_work_group_size
    return tiles if fits else SMALL_TILES


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
