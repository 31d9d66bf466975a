"""Shard a weight across the ranks, multiply, check against numpy, print a table.

    mpirun -n 4 python -m cmatrix run jobs/matmul.py [w0 w1 w2 w3]
    python jobs/matmul.py                      # one rank, no mpirun needed
"""

import sys
import time

import numpy as np

import cmatrix as cm

weights = [float(w) for w in sys.argv[1:]] or None
cl = cm.init(weights=weights)
print(cl.ranks, end="\n\n")

K, N, PREFILL, STEPS = 2048, 4096, 32, 50
rng = np.random.default_rng(0)
w = rng.standard_normal((K, N), dtype=np.float32) / np.float32(np.sqrt(K))
x = rng.standard_normal((PREFILL, K), dtype=np.float32)
rows = []


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def record(what, shape, seconds, got=None, ref=None):
    err = "" if ref is None else f"{np.max(np.abs(got - ref)) / np.max(np.abs(ref)):.1e}"
    ok = "" if ref is None else ("yes" if float(err) < 1e-5 else "NO")
    rows.append((what, shape, f"{seconds * 1e3:8.2f} ms", err, ok))


W, t = timed(lambda: cl.shard(w, name="demo.w"))
record("shard W (once)", f"{K}x{N} f32", t)
y, t = timed(lambda: cl.matmul(x, W), repeat=3)
record("prefill x @ W", f"{PREFILL}x{K} @ {K}x{N}", t, y, x @ w)
x1 = x[:1]
y1, t = timed(lambda: cl.matmul(x1, W), repeat=STEPS)
record("decode x @ W (best of 50)", f"1x{K} @ {K}x{N}", t, y1, x1 @ w)
wt = cl.shard(w.T.copy(), axis=0, name="demo.w_t")
yt, t = timed(lambda: cl.matmul(x, wt, transpose_b=True), repeat=3)
record("x @ W_t.T (flag, no copy)", f"{PREFILL}x{K} @ ({N}x{K}).T", t, yt, x @ w)
s, t = timed(lambda: cl.sub(cl.add(W, W, out="keep"), W))
record("(W + W) - W, shard-wise", f"{K}x{N}", t, s, w)

widths = [max(len(r[i]) for r in rows) for i in range(5)]
header = ("operation", "shape", "time", "rel err", "ok")
widths = [max(w_, len(h)) for w_, h in zip(widths, header, strict=True)]
for r in (header, *rows):
    print("  ".join(c.ljust(w_) for c, w_ in zip(r, widths, strict=True)))
print(f"\n{cl.size} ranks, {cl.stats()['bytes_moved'] / 2**20:.1f} MiB moved between ranks")
sys.exit(0 if all(r[4] != "NO" for r in rows) else 1)
