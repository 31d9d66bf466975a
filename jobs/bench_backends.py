"""GFLOP/s of every backend on one core, next to numpy in the same run.

    python jobs/bench_backends.py [--gemm 2048] [--gemv 4096] [--backends numpy,torch,opencl,ggml]

For GEMM n^3 and GEMV 1xn @ nxn (weight resident, as in decoding), each
backend runs with one thread on its CPU path (``accel=False``; pass --accel to
use accelerators). A timed call is what a rank does per operation: upload the
activation, multiply by the resident weight, download the result. Weights are
float32, float16, bfloat16, and q8_0/q4_0 on backends that store quantised
blocks (others would hold the same weight as float32: see the f32 row).
Ratios are against numpy float32 (OpenBLAS, one thread) measured in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any BLAS or torch loads

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cmatrix import backends  # noqa: E402
from cmatrix.core.dtypes import from_float32, to_float32  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16", "q8_0", "q4_0")
SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0"}


def best_time(fn, min_repeats: int, budget_s: float) -> float:
    fn()  # warm-up: kernel builds, first-touch pages, layouts made on first use
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_repeats or spent < budget_s:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent, runs = min(best, dt), spent + dt, runs + 1
        if runs >= 200:
            break
    return best


def measure(backend, dtype: str, m: int, n: int, repeats: int, budget_s: float) -> tuple[float, float]:
    """(seconds per call, max relative error vs float64 numpy on the same weight values)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n), dtype=np.float32)
    x = rng.standard_normal((m, n), dtype=np.float32)
    if dtype in ("q8_0", "q4_0"):
        handle = backend.upload(w, "float32", quant=dtype, quant_axis=0)
        w_values = backend.download(handle, "float32")
    else:
        stored = from_float32(w, dtype)
        handle = backend.upload(stored, dtype)
        w_values = to_float32(stored, dtype)

    def call():
        return backend.download(backend.matmul(backend.upload(x, "float32"), handle), "float32")

    y = call()
    ref = x.astype(np.float64) @ w_values.astype(np.float64)
    err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    seconds = best_time(call, repeats, budget_s)
    backend.free(handle)
    return seconds, err


NAIVE_SOURCE = """
__kernel void naive(__global const float *a, __global const float *b, __global float *c,
                    const int m, const int k, const int n) {
    const int i = get_global_id(1), j = get_global_id(0);
    if (i >= m || j >= n) return;
    float acc = 0.0f;
    for (int p = 0; p < k; ++p) acc += a[i * k + p] * b[p * n + j];
    c[i * n + j] = acc;
}
"""


def naive_opencl(m: int, n: int) -> tuple[float, str]:
    """Seconds per call of a textbook one-output-per-work-item kernel (float32), for scale."""
    import pyopencl as cl

    from cmatrix.backends.opencl import OpenCLBackend

    backend = OpenCLBackend(threads=1, accel=False)
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((m, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    kernel = cl.Program(backend.context, NAIVE_SOURCE).build().naive
    flags = cl.mem_flags
    a_buf = cl.Buffer(backend.context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=a)
    w_buf = cl.Buffer(backend.context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=w)
    c = np.empty((m, n), np.float32)
    c_buf = cl.Buffer(backend.context, flags.WRITE_ONLY, c.nbytes)

    def call():
        kernel(backend.queue, (n, m), None, a_buf, w_buf, c_buf, np.int32(m), np.int32(n), np.int32(n))
        cl.enqueue_copy(backend.queue, c, c_buf, is_blocking=True)

    return best_time(call, 1, 0.0), backend.device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemm", type=int, default=2048, help="GEMM size n (n x n x n)")
    parser.add_argument("--gemv", type=int, default=4096, help="GEMV size n (1 x n @ n x n)")
    parser.add_argument("--backends", default=",".join(backends.available()))
    parser.add_argument("--accel", action="store_true", help="use accelerators where present")
    ns = parser.parse_args()
    names = [backends.canonical(b) for b in ns.backends.split(",")]
    names.sort(key=lambda b: b != "numpy")  # the baseline first
    cases = [("GEMM", ns.gemm, ns.gemm, 3, 1.0), ("GEMV", 1, ns.gemv, 20, 0.5)]
    print(f"one thread per backend; GEMM {ns.gemm}^3, GEMV 1x{ns.gemv} @ {ns.gemv}x{ns.gemv}; "
          "per call: upload x, multiply by the resident weight, download y\n")
    header = (f"{'case':<5} {'backend':<8} {'weight':<6} {'ms/call':>9} {'GFLOP/s':>8} "
              f"{'vs numpy f32':>12}  {'max rel err':>11}  device")
    print(header)
    print("-" * len(header))
    status = 0
    for case, m, n, repeats, budget in cases:
        flops = 2.0 * m * n * n
        baseline = None
        for name in names:
            try:
                backend = backends.create(name, threads=1, accel=ns.accel)
            except Exception as exc:
                print(f"{case:<5} {name:<8} unavailable: {exc}")
                continue
            native_quant = getattr(backend, "quantised", ())
            for dtype in DTYPES:
                if dtype.startswith("q") and dtype not in native_quant:
                    continue
                if not backend.supports("matmul", dtype, (n, n)):
                    continue
                try:
                    seconds, err = measure(backend, dtype, m, n, repeats, budget)
                except Exception as exc:
                    print(f"{case:<5} {name:<8} {SHORT[dtype]:<6} failed: {type(exc).__name__}: {exc}")
                    status = 1
                    continue
                if baseline is None and name == "numpy" and dtype == "float32":
                    baseline = seconds
                ratio = f"{baseline / seconds:.2f}x" if baseline else "-"
                gflops = flops / seconds / 1e9
                print(f"{case:<5} {name:<8} {SHORT[dtype]:<6} {seconds * 1e3:9.2f} {gflops:8.1f} "
                      f"{ratio:>12}  {err:11.1e}  {backend.device}", flush=True)
            close = getattr(backend, "close", None)
            if close is not None:
                close()
            if name == "opencl":  # a naive kernel, to show what the tiling buys
                size = min(n, 512) if case == "GEMM" else n
                seconds, device = naive_opencl(m if case == "GEMV" else size, size)
                gflops = 2.0 * (m if case == "GEMV" else size) * size * size / seconds / 1e9
                ratio = f"{gflops / (flops / baseline / 1e9):.2f}x" if baseline else "-"  # by GFLOP/s
                label = f"naive {size}" if size != n else "naive"
                print(f"{case:<5} {'opencl':<8} {'f32':<6} {'':>9} {gflops:8.1f} {ratio:>12}  "
                      f"{'':>11}  {label} kernel, one output per work-item", flush=True)
    print("\nvs numpy f32 > 1 means faster than numpy. Quantised rows only where the backend stores "
          "quantised blocks.")
    return status


if __name__ == "__main__":
    sys.exit(main())
