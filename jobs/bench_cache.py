"""Weight cache (time to first result) and same-host shared-window transfers, ratios from one run.

    python jobs/bench_cache.py [--part all|cache|window] [--ranks 2]    # both parts by default
    mpirun -n N python -m cmatrix run jobs/bench_cache.py --cache-part   # only part A, N ranks
    mpirun -n N python jobs/bench_cache.py --window-part                 # only part B, N ranks

Part A ("cache"): a 4096x16384 float32 weight, from the start of cl.shard(...) to the end of
the first 1x4096 matmul with it: plain shard, cache="save", cache="load" while the saved
weight is still resident, and cache="load" from disk (page cache warm, then evicted). The job
gets a fresh CMATRIX_CACHE_DIR, deleted afterwards. Part B ("window"): MPI Bcast vs
Comm.bcast_shared, and Gatherv / subarray sends vs Comm.gather_shared, 16 KiB to 256 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np

NAME = "bench.cache.w"
CACHE_KEYS = ("baseline", "save", "load_memory", "load_disk", "load_cold")
SIZES_MB = (1 / 64, 1 / 4, 1, 4, 16, 64, 256)  # 16 KiB: one decode-step activation
ROWS = 1024  # rows of the gathered matrices


# ---- part A: cache, under cmatrix (rank 0 drives) --------------------------------------------

def evict(folder: str) -> None:
    """Push the cache files out of the OS page cache (flush first: dirty pages stay)."""
    for root, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cache_half(repeats: int) -> dict:
    import cmatrix as cm

    cl = cm.init()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 16384), dtype=np.float32)
    x = rng.standard_normal((1, 4096), dtype=np.float32)
    ref = x @ w
    warm = cl.shard(w[:, :256].copy())  # backend start-up, outside every timing
    cl.matmul(x, warm)
    warm.free()
    times: dict[str, list[float]] = {k: [] for k in CACHE_KEYS}
    moved: dict[str, int] = {}
    err = 0.0

    def first(key: str, make):
        nonlocal err
        before = cl.stats()["bytes_moved"]
        t = time.perf_counter()
        m = make()
        y = cl.matmul(x, m)
        times[key].append(time.perf_counter() - t)
        moved[key] = cl.stats()["bytes_moved"] - before
        err = max(err, float(np.max(np.abs(y - ref)) / np.max(np.abs(ref))))
        return m

    def load():
        return cl.shard(None, name=NAME, cache="load")

    for _ in range(repeats):
        first("baseline", lambda: cl.shard(w)).free()
        W = first("save", lambda: cl.shard(w, name=NAME, cache="save"))
        first("load_memory", load).free()
        W.free()  # device memory only: the files stay
        first("load_disk", load).free()
        evict(os.environ["CMATRIX_CACHE_DIR"])
        first("load_cold", load).free(disk=True)
    return {"times": times, "moved": moved, "rel_err": err, "ranks": cl.size}


def cache_table(r: dict) -> None:
    best = {k: min(v) for k, v in r["times"].items()}
    labels = {"baseline": "shard(w), no cache", "save": 'cache="save"',
              "load_memory": 'cache="load", W still resident', "load_disk": 'cache="load" from disk',
              "load_cold": 'cache="load", page cache evicted'}
    print(f"\nA. time to first result, 4096x16384 float32 (256 MB), {r['ranks']} ranks, best of "
          f"{len(r['times']['baseline'])}")
    print(f"{'variant':34} {'ms':>9} {'MB moved':>9}")
    for k in CACHE_KEYS:
        print(f"{labels[k]:34} {best[k] * 1e3:9.1f} {r['moved'][k] / 2**20:9.2f}")
    print(f"ratios: save/baseline {best['save'] / best['baseline']:.2f}, load_disk/save "
          f"{best['load_disk'] / best['save']:.2f}, load_cold/save {best['load_cold'] / best['save']:.2f}, "
          f"load_memory/save {best['load_memory'] / best['save']:.2f}; max rel err {r['rel_err']:.1e}")


# ---- part B: shared window, plain mpiexec (every rank runs this) ----------------------------

def best_of(comm, fn, repeats: int) -> float:
    """Best time of ``fn`` on every rank, barrier before and after (the driver's clock)."""
    fn()  # warm-up: first touch, window growth
    out = []
    for _ in range(repeats):
        comm.world.Barrier()
        t = time.perf_counter()
        fn()
        comm.world.Barrier()
        out.append(time.perf_counter() - t)
    return min(out)


def pattern(rows: slice, cols: slice, width: int) -> np.ndarray:
    """Entries of the full matrix, unique within 2**24 consecutive positions."""
    i = np.arange(rows.start, rows.stop, dtype=np.int64)[:, None]
    j = np.arange(cols.start, cols.stop, dtype=np.int64)[None, :]
    return ((i * width + j) % (1 << 24)).astype(np.float32)


def touch(comm, a: np.ndarray) -> None:
    """bcast_shared; workers read one value per 4 KiB page of the view."""
    view = comm.bcast_shared(a)
    if not comm.is_driver:
        float(view[::1024].sum())


def copy_out(comm, a: np.ndarray, out: np.ndarray) -> None:
    """bcast_shared; workers copy the view into their own array (what Bcast delivers)."""
    view = comm.bcast_shared(a)
    if not comm.is_driver:
        np.copyto(out, view)


def window_half(sizes: tuple[float, ...] = SIZES_MB) -> dict | None:
    from cmatrix.core.plan import Plan, equal_weights
    from cmatrix.engine.comm import Comm

    comm = Comm()
    rows = {}
    for mb in sizes:
        n = int(mb * 2**20) // 4
        k = max(5, min(200, int(64 // mb)))
        a = np.arange(n, dtype=np.float32) if comm.is_driver else np.empty(n, np.float32)
        mine = np.empty(n, np.float32)
        ok = bool(np.array_equal(comm.bcast_shared(a), np.arange(n, dtype=np.float32)))
        row = {"bcast": best_of(comm, partial(comm.bcast, a), k),
               "view": best_of(comm, partial(touch, comm, a), k),
               "copy": best_of(comm, partial(copy_out, comm, a, mine), k)}
        del a, mine
        cols = n // ROWS
        full = np.empty((ROWS, cols), np.float32) if comm.is_driver else None
        expected = pattern(slice(0, ROWS), slice(0, cols), cols) if comm.is_driver else None
        for axis, key in ((1, "cols"), (0, "rows")):
            plan = Plan.from_weights((ROWS, cols)[axis], equal_weights(comm.size), axis)
            mine_r = plan.block(comm.rank) if axis == 0 else slice(0, ROWS)
            mine_c = plan.block(comm.rank) if axis == 1 else slice(0, cols)
            block = pattern(mine_r, mine_c, cols)
            for fn in (comm.gather_blocks, comm.gather_shared):
                if comm.is_driver:
                    full[...] = -1
                fn(block, full, plan)
                if comm.is_driver:
                    ok &= bool(np.array_equal(full, expected))
            row[f"{key}_mpi"] = best_of(comm, partial(comm.gather_blocks, block, full, plan), k)
            row[f"{key}_shared"] = best_of(comm, partial(comm.gather_shared, block, full, plan), k)
            del block
        row["ok"] = not comm.any_failed(not ok)
        rows[mb] = row
        del full, expected
    comm.free_shared()
    return {"ranks": comm.size, "host": comm.host, "rows": rows} if comm.is_driver else None


def window_table(r: dict) -> None:
    ms = 1e3
    print(f"\nB1. broadcast, driver -> {r['ranks'] - 1} worker(s) on one host; best ms (barrier to barrier)")
    print(f"{'MB':>8} {'Bcast':>9} {'shm view':>9} {'shm+copy':>9} {'view/Bcast':>11} {'copy/Bcast':>11}")
    for mb, x in r["rows"].items():
        print(f"{mb:>8} {x['bcast'] * ms:9.3f} {x['view'] * ms:9.3f} {x['copy'] * ms:9.3f} "
              f"{x['view'] / x['bcast']:11.2f} {x['copy'] / x['bcast']:11.2f}")
    print(f"\nB2. gather to the driver, {ROWS} rows x N cols, equal blocks; best ms")
    print(f"{'MB':>8} {'cols: MPI':>10} {'shm':>9} {'ratio':>6}   {'rows: Gatherv':>13} {'shm':>9} "
          f"{'ratio':>6}  ok")
    for mb, x in r["rows"].items():
        print(f"{mb:>8} {x['cols_mpi'] * ms:10.3f} {x['cols_shared'] * ms:9.3f} "
              f"{x['cols_shared'] / x['cols_mpi']:6.2f}   {x['rows_mpi'] * ms:13.3f} "
              f"{x['rows_shared'] * ms:9.3f} {x['rows_shared'] / x['rows_mpi']:6.2f}  {x['ok']}")
    print("ratio < 1: the shared window is faster. 'shm view': workers only touch one value per page;"
          " 'shm+copy': workers copy it out (what Bcast delivers).")


# ---- top level ---------------------------------------------------------------------------------

def launch(cmd: list[str], env: dict) -> dict | None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "cache", "window"), default="all")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="part A: rounds of every variant")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_MB)), help="part B: message sizes, MB")
    ap.add_argument("--cache-part", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--window-part", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from cmatrix.engine.launch import command, environment, launched_by_mpiexec

    if args.window_part:
        result = window_half(tuple(float(mb) for mb in args.sizes.split(",")))
        if result is not None:  # the driver
            window_table(result)
            print("RESULT " + json.dumps(result))
        return 0
    if args.cache_part or launched_by_mpiexec():
        result = cache_half(args.repeats)
        cache_table(result)
        print("RESULT " + json.dumps(result))
        return 0

    env = environment(threads=1)
    failed = False
    if args.part in ("all", "cache"):
        print(f"A. cache: {args.ranks} ranks x 1 thread ...", flush=True)
        folder = tempfile.mkdtemp(prefix="cmatrix-bench-cache-")
        try:
            result = launch(command(args.ranks, [sys.executable, "-m", "cmatrix", "run",
                                                 os.path.abspath(__file__), "--cache-part",
                                                 f"--repeats={args.repeats}"]),
                            {**env, "CMATRIX_CACHE_DIR": folder})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        failed |= result is None
        if result:
            cache_table(result)
    if args.part in ("all", "window"):
        print(f"B. shared window: {args.ranks} ranks x 1 thread ...", flush=True)
        # every rank runs the window part itself: cmatrix must not turn the workers into servers
        result = launch(command(args.ranks, [sys.executable, os.path.abspath(__file__), "--window-part",
                                             f"--sizes={args.sizes}"]),
                        {**env, "CMATRIX_EVERY_RANK": "1"})
        failed |= result is None
        if result:
            window_table(result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
