"""Resident-weight cache across jobs. Run with CMATRIX_CACHE_DIR set:

    mpiexec -n N python -m cmatrix run tests/jobs/cache_job.py save WEIGHTS_JSON OUT_DIR
    mpiexec -n N python -m cmatrix run tests/jobs/cache_job.py load WEIGHTS_JSON OUT_DIR
    mpiexec -n N python -m cmatrix run tests/jobs/cache_job.py stale WEIGHTS_JSON OUT_DIR

``save`` stores two weights (float32 split by columns, float16 split by rows,
each sent in several bands) and the results of using them; ``load`` (a new
job) loads both without the data and checks results and bytes moved;
``stale`` checks every way a cache can go stale.
"""

import json
import sys
from pathlib import Path

import numpy as np

import cmatrix as cm
from cmatrix.io import shardfiles as cache
from cmatrix.ops import placement

mode, weights, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
cl = cm.init(weights=weights)
placement.BAND_BYTES = 8 << 10  # several bands even for these small matrices (the driver decides)
rng = np.random.default_rng(7)
w1 = rng.standard_normal((96, 130), dtype=np.float32)
w2 = rng.standard_normal((70, 40)).astype(np.float16)
x1 = rng.standard_normal((5, 96), dtype=np.float32)
x2 = rng.standard_normal((3, 70)).astype(np.float16)


def results(W1, W2):
    return cl.matmul(x1, W1), cl.matmul(x2, W2, transpose_a=False)


if mode == "save":
    W1 = cl.shard(w1, name="t.w1", cache="save")
    W2 = cl.shard(w2, name="t.w2", axis=0, cache="save")
    y1, y2 = results(W1, W2)
    np.save(out / "y1.npy", y1)
    np.save(out / "y2.npy", y2)
    print(cl.cached())
    print("SAVE-OK")

elif mode == "load":
    before = cl.stats()["bytes_moved"]
    W1 = cl.shard(None, name="t.w1", cache="load")
    W2 = cl.shard(None, name="t.w2", cache="load")
    assert cl.stats()["bytes_moved"] == before, "load sent data"
    assert (W2.axis, W2.dtype, W2.shape) == (0, "float16", (70, 40)), W2
    y1, y2 = results(W1, W2)
    np.testing.assert_array_equal(y1, np.load(out / "y1.npy"))
    np.testing.assert_array_equal(y2, np.load(out / "y2.npy"))
    n, c1 = cl.size, W1.counts
    # Activations only: x1 to every worker, y1's columns from workers, x2's row
    # slices to workers, and y2's float32 partial sums.
    expected = (x1.nbytes * (n - 1) + 5 * (130 - c1[0]) * 4
                + 3 * (70 - W2.counts[0]) * 2 + 3 * 40 * 4 * (n - 1))
    moved = cl.stats()["bytes_moved"] - before
    print(f"MOVED {moved} EXPECTED {expected}")
    assert moved == expected, (moved, expected)
    # A second load while W1 is resident reuses memory: the same handle data, nothing read.
    again = cl.shard(w1, name="t.w1", cache="load")
    np.testing.assert_array_equal(cl.matmul(x1, again), y1)
    listing = cl.cached()
    print(listing)
    assert {(e["rank"], e["name"]) for e in listing} == {(r, nm) for r in range(n) for nm in ("t.w1", "t.w2")}
    assert all(e["memory_bytes"] > 0 or 0 in (W1.counts[e["rank"]], W2.counts[e["rank"]]) for e in listing)
    print("LOAD-OK")

elif mode == "stale":
    last = cl.size - 1
    host = cl.ranks[last].host

    def expect_stale(case, fn, *needles):
        try:
            fn()
        except cm.CacheError as exc:
            text = str(exc)
            missing = [s for s in (f"rank {last} on host {host}", *needles) if s not in text]
            assert not missing, f"{case}: {missing} not in:\n{text}"
            print(f"STALE-OK {case}")
            return
        raise AssertionError(f"{case}: no CacheError")

    changed = w1.copy()
    changed[0, -1] += 1  # the last column belongs to the last rank
    expect_stale("changed-weight", lambda: cl.shard(changed, name="t.w1", cache="load"),
                 "weight differs", str(cache.shard_path("t.w1", last)))
    shifted = [0.5, 0.5] if cl.size == 2 else list(np.roll(weights, 1))
    expect_stale("changed-plan", lambda: cl.shard(None, name="t.w1", weights=shifted, cache="load"),
                 "plan differs")
    path = cache.shard_path("t.w1", last)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    expect_stale("corrupted", lambda: cl.shard(None, name="t.w1", cache="load"), "corrupted", str(path))
    path.write_bytes(bytes(data[:-100]))
    expect_stale("truncated", lambda: cl.shard(None, name="t.w1", cache="load"), "truncated", str(path))
    path.unlink()
    expect_stale("missing", lambda: cl.shard(None, name="t.w1", cache="load"), "does not exist")
    # auto: only the stale rank is sent its block, and it saves it again
    before = cl.stats()["bytes_moved"]
    W1 = cl.shard(w1, name="t.w1", cache="auto")
    sent = cl.stats()["bytes_moved"] - before
    assert sent == 96 * W1.counts[last] * 4, (sent, W1.counts)
    np.testing.assert_array_equal(cl.matmul(x1, W1), np.load(out / "y1.npy"))
    W1.free()
    assert cl.matmul(x1, cl.shard(None, name="t.w1", cache="load")).shape == (5, 130)
    print("STALE-OK auto-resends-stale-rank")
    cl.free("t.w2", disk=True)
    assert not cache.shard_path("t.w2", 0).exists()
    assert all(e["name"] != "t.w2" for e in cl.cached())
    print("STALE-OK free-disk")
