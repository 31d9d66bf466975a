"""GEMM and resident-weight GEMV: cmatrix ranks vs single-process numpy, same run.

    python jobs/bench_gemm.py [--ranks 2] [--size 4096]     # full benchmark with ratios (make bench)
    mpirun -n N python -m cmatrix run jobs/bench_gemm.py     # only the cmatrix half, N ranks

The numpy baseline uses every core of this machine in one process and is
measured while no MPI job runs (waiting MPI ranks poll and would slow it);
then the cmatrix half runs with one thread per rank. Goals: GEMM <= 1.10x
numpy (result gathered to the driver), GEMV <= 1.5x (weight resident).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GOALS = {"gemm": 1.10, "gemv": 1.5}


def timings(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first-touch pages, BLAS buffers
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def inputs(n: int):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    w = rng.standard_normal((n, n), dtype=np.float32)
    return a, w, a[:1].copy()


def numpy_half(n: int, repeats: int, gemv_repeats: int) -> dict:
    a, w, x = inputs(n)
    return {"gemm": timings(lambda: a @ w, repeats), "gemv": timings(lambda: x @ w, gemv_repeats),
            "threads": os.cpu_count()}


def cmatrix_half(n: int, repeats: int, gemv_repeats: int) -> dict:
    import cmatrix as cm

    cl = cm.init()
    a, w, x = inputs(n)
    t = time.perf_counter()
    W = cl.shard(w, name="bench.w")
    upload = time.perf_counter() - t
    y = cl.matmul(a, W)
    err = float(np.max(np.abs(y - a @ w)) / np.max(np.abs(a @ w)))
    before = cl.stats()["bytes_moved"]
    gemv = timings(lambda: cl.matmul(x, W), gemv_repeats)
    per_call = (cl.stats()["bytes_moved"] - before) / (gemv_repeats + 1)
    return {"gemm": timings(lambda: cl.matmul(a, W), repeats), "gemv": gemv, "upload": upload,
            "ranks": cl.size, "threads": cl.ranks[0].threads, "rel_err": err,
            "gemv_bytes_per_call": per_call}


def fmt(seconds: list[float]) -> str:
    return f"{min(seconds) * 1e3:9.2f} ms (median {statistics.median(seconds) * 1e3:.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gemv-repeats", type=int, default=200)
    ap.add_argument("--cluster-part", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from cmatrix.engine.launch import command, environment, launched_by_mpiexec

    if args.cluster_part or launched_by_mpiexec():
        result = cmatrix_half(args.size, args.repeats, args.gemv_repeats)
        print(f"cmatrix, {result['ranks']} ranks x {result['threads']} thread(s), n={args.size}:")
        print(f"  upload W once  {result['upload'] * 1e3:9.2f} ms")
        print(f"  GEMM           {fmt(result['gemm'])}")
        print(f"  GEMV resident  {fmt(result['gemv'])}")
        print("RESULT " + json.dumps(result))
        return 0

    print(f"numpy baseline: one process, {os.cpu_count()} cores ...", flush=True)
    base = numpy_half(args.size, args.repeats, args.gemv_repeats)
    print(f"cmatrix: {args.ranks} ranks x 1 thread ...", flush=True)
    cmd = command(args.ranks, [sys.executable, "-m", "cmatrix", "run", os.path.abspath(__file__),
                               "--cluster-part", f"--size={args.size}", f"--repeats={args.repeats}",
                               f"--gemv-repeats={args.gemv_repeats}"])
    proc = subprocess.run(cmd, env=environment(threads=1), capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return 1
    ours = json.loads(lines[-1][len("RESULT "):])
    n = args.size
    print(f"\nn={n}, float32; cmatrix {ours['ranks']} ranks x {ours['threads']} thread; "
          f"numpy {base['threads']} threads; best of runs (median in brackets)")
    print(f"{'shape':34} {'numpy':28} {'cmatrix':28} {'ratio':>6}  goal")
    ok = True
    for key, label in (("gemm", f"GEMM {n}x{n}x{n} (gathered)"),
                       ("gemv", f"GEMV 1x{n} @ {n}x{n} (resident W)")):
        ratio = min(ours[key]) / min(base[key])
        ok &= ratio <= GOALS[key]
        print(f"{label:34} {fmt(base[key]):28} {fmt(ours[key]):28} {ratio:6.2f}  <= {GOALS[key]}")
    print(f"\nrelative error vs numpy {ours['rel_err']:.1e}; weight upload once "
          f"{ours['upload'] * 1e3:.0f} ms; GEMV moves {ours['gemv_bytes_per_call'] / 1024:.1f} KiB/call")
    print("goals met" if ok else "goals NOT met on this run (shared machines are noisy: rerun)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
