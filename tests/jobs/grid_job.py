"""Grid mode (grid_matmul, grid_add, grid_sub) against a float64 numpy reference.

Run: mpiexec -n N python -m cmatrix run tests/jobs/grid_job.py [WEIGHTS] [GRID] [BACKENDS] [faults]
Each of WEIGHTS ('[w0, ...]'), GRID ('[p, q]') and BACKENDS ('["numpy", ...]') is JSON or
"null". With "faults" the job first makes one call per item of CMATRIX_FAULT (grid_matmul
or grid_elementwise items) and expects each to raise a RankError naming that rank and step. Prints
"grid: C checks, F failures on N ranks" and exits non-zero listing every failure.
"""

import itertools
import json
import os
import sys
import tempfile

import numpy as np
from tally import Tally

import cmatrix as cm
from cmatrix.core.dtypes import bf16_to_float32, float32_to_bf16

try:  # the Open MPI test environment has no torch
    import torch
except ImportError:
    torch = None


def arg(i):
    return json.loads(sys.argv[i]) if len(sys.argv) > i else None


weights, grid, backend_list = arg(1), arg(2), arg(3)
expect_faults = len(sys.argv) > 4 and sys.argv[4] == "faults"
cl = cm.init(weights=weights, backends=backend_list)
print(cl.ranks)
rng = np.random.default_rng(cl.size)
# Relative to |op(a)| @ |op(b)| (or |a| + |b|): float32 accumulation plus rounding of the output.
RTOL = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
t = Tally("grid", cl)
refused = t.refused


def make(shape, dtype, kind="numpy"):
    """(user array, its exact float64 values)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype == "bfloat16":
        exact = bf16_to_float32(float32_to_bf16(x)).astype(np.float64)
        return torch.from_numpy(exact.astype(np.float32)).to(torch.bfloat16), exact
    x = x.astype(np.float16) if dtype == "float16" else x
    exact = x.astype(np.float64)
    return (torch.from_numpy(x) if kind == "torch" else x), exact


def check(label, got, ref, scale, dtype, kind, out_dtype=None):
    t.close(label, got, ref, RTOL[dtype], scale, kind, out_dtype)


def matmul_case(label, a, a64, b, b64, ta, tb, inner, dtype, kind, out_dtype, **kw):
    op_a, op_b = (a64.T if ta else a64), (b64.T if tb else b64)
    got = cl.grid_matmul(a, b, transpose_a=ta, transpose_b=tb, grid=grid, inner=inner, **kw)
    check(label, got, op_a @ op_b, np.abs(op_a) @ np.abs(op_b), dtype, kind, out_dtype)


if expect_faults:  # each injected failure: a RankError naming its rank, then the cluster goes on
    x = np.ones((5, 6), np.float32)
    calls = {"grid_matmul": lambda: cl.grid_matmul(x, x.T.copy(), grid=grid, inner=True),
             "grid_elementwise": lambda: cl.grid_add(x, x, grid=grid)}
    for item in os.environ["CMATRIX_FAULT"].split(","):
        op, phase, rank = item.split(":")[:3]
        try:
            calls[op]()
            t.check(f"fault {item}", False, "no RankError")
        except cm.RankError as err:
            got = [(f.op, f.phase, f.rank) for f in err.failures]
            t.check(f"fault {item}", got == [(op, phase, int(rank))] and "InjectedFault" in str(err),
                    f"unexpected report {err}")
            print("CAUGHT", err.failures[0].headline())

dtype_list = ["float32", "float16"] + (["bfloat16"] if torch is not None else [])
shapes = [(1, 1, 1), (1, 37, 1), (7, 1, 13), (13, 17, 1), (16, 16, 16), (31, 29, 37), (3, 64, 96)]
for dtype, (m, k, n) in itertools.product(dtype_list, shapes):
    kind = "torch" if dtype == "bfloat16" else "numpy"
    for ta, tb in itertools.product((False, True), repeat=2):
        a, a64 = make((k, m) if ta else (m, k), dtype)
        b, b64 = make((n, k) if tb else (k, n), dtype)
        for inner in (False, True):
            label = f"matmul {dtype} {m}x{k}x{n} ta={ta} tb={tb} inner={inner}"
            matmul_case(label, a, a64, b, b64, ta, tb, inner, dtype, kind, dtype)

# Mixed dtypes give float32; transposed numpy views; torch in -> torch out.
a, a64 = make((9, 12), "float16")
b, b64 = make((12, 10), "float32")
for inner in (False, True):
    matmul_case(f"mixed f16 x f32 inner={inner}", a, a64, b, b64, False, False, inner, "float16",
                "numpy", "float32")
    matmul_case(f"transposed views inner={inner}", b.T, b64.T, a.T, a64.T, False, False, inner,
                "float16", "numpy", "float32")
    matmul_case(f"view with flag inner={inner}", a.T, a64.T, b, b64, True, False, inner, "float16",
                "numpy", "float32")
if torch is not None:
    for dtype, inner in itertools.product(("float32", "float16"), (False, True)):
        ta_, ta64 = make((11, 8), dtype, "torch")
        tb_, tb64 = make((8, 5), dtype)
        matmul_case(f"torch a {dtype} inner={inner}", ta_, ta64, tb_, tb64, False, False, inner,
                    dtype, "torch", dtype)
        matmul_case(f"torch b {dtype} inner={inner}", tb_, tb64, ta_, ta64, True, True, inner, dtype,
                    "torch", dtype)

# Per-call shares, including zero shares that leave whole grid rows or columns empty.
size = cl.size
call_weights = [[1.0 / size] * size, [0.0] * (size - 1) + [1.0]]
if size >= 2:
    call_weights.append([0.5, 0.5] + [0.0] * (size - 2))
a, a64 = make((10, 13), "float32")
b, b64 = make((13, 11), "float32")
for w, inner in itertools.product(call_weights, (False, True)):
    matmul_case(f"weights={w} inner={inner}", a, a64, b, b64, False, False, inner, "float32", "numpy",
                "float32", weights=w)

# Elementwise add and sub, with every transpose combination.
for dtype, (m, n) in itertools.product(dtype_list, [(1, 1), (1, 9), (11, 7), (16, 16)]):
    kind = "torch" if dtype == "bfloat16" else "numpy"
    for ta, tb in itertools.product((False, True), repeat=2):
        p, p64 = make((n, m) if ta else (m, n), dtype)
        q, q64 = make((n, m) if tb else (m, n), dtype)
        op_p, op_q = (p64.T if ta else p64), (q64.T if tb else q64)
        scale = np.abs(op_p) + np.abs(op_q)
        for name, fn, ref in (("add", cl.grid_add, op_p + op_q), ("sub", cl.grid_sub, op_p - op_q)):
            got = fn(p, q, transpose_a=ta, transpose_b=tb, grid=grid)
            check(f"{name} {dtype} {m}x{n} ta={ta} tb={tb}", got, ref, scale, dtype, kind, dtype)
p, p64 = make((6, 5), "float16")
q, q64 = make((6, 5), "float32")
check("sub mixed, per-call weights", cl.grid_sub(p, q, grid=grid, weights=call_weights[-1]), p64 - q64,
      np.abs(p64) + np.abs(q64), "float16", "numpy", "float32")

# Bytes moved: nothing on one rank; on an equal 2x2 grid exactly the blocks and results.
x, x64 = make((16, 16), "float32")
before = cl.stats()["bytes_moved"]
matmul_case("bytes", x, x64, x, x64, False, False, False, "float32", "numpy", "float32",
            weights=[1.0 / size] * size)
moved = cl.stats()["bytes_moved"] - before
if size == 1:
    t.check("bytes", moved == 0, f"a one-rank cluster moved {moved} bytes")
if size == 4 and grid in (None, [2, 2]):
    expected = 3 * (8 * 16 + 16 * 8) * 4 + 3 * 8 * 8 * 4  # blocks out, result blocks back
    t.check("bytes", moved == expected, f"moved {moved}, expected {expected}")

# File sinks.
with tempfile.TemporaryDirectory() as tmp:
    os.environ["CMATRIX_SHM_DIR"] = tmp
    a, a64 = make((5, 4), "float32")
    b, b64 = make((4, 6), "float32")
    path = cl.grid_matmul(a, b, grid=grid, inner=True, out="shm:grid_result")
    got = np.fromfile(path, dtype=np.float32, offset=20).reshape(5, 6)
    check("shm sink", got, a64 @ b64, np.abs(a64) @ np.abs(b64), "float32", "numpy")
    try:
        import h5py
    except ImportError:
        h5py = None
    if h5py is not None:
        where = cl.grid_sub(a, a, grid=grid, out=f"h5:{tmp}/r.h5#/d")
        with h5py.File(f"{tmp}/r.h5", "r") as f:
            check("h5 sink", f["d"][()], np.zeros((5, 4)), np.abs(a64), "float32", "numpy")
            t.check("h5 sink", where == f"{tmp}/r.h5#/d" and f["d"].attrs["operation"] == "grid_sub",
                    f"wrote {where} with {dict(f['d'].attrs)}")

# Validation on the driver before anything moves; the cluster stays usable.
a, a64 = make((4, 6), "float32")
b, b64 = make((6, 3), "float32")
refused("bad grid", f"but the cluster has {size} ranks", lambda: cl.grid_matmul(a, b, grid=(size + 1, 1)))
refused("grid shape", "grid: expected (p, q)", lambda: cl.grid_add(a, a, grid=size))
refused("inner dims", "inner dimensions differ", lambda: cl.grid_matmul(a, b, transpose_b=True))
refused("inner dims, inner", "inner dimensions differ", lambda: cl.grid_matmul(a, a, inner=True))
refused("keep", "not kept resident", lambda: cl.grid_matmul(a, b, out="keep"))
refused("keep add", "not kept resident", lambda: cl.grid_add(a, a, out="keep"))
refused("bad out", "out:", lambda: cl.grid_matmul(a, b, out="nowhere"))
refused("weights", "one share per rank", lambda: cl.grid_matmul(a, b, weights=[1.0] * (size + 1)))
refused("weights sum", "sum to 1", lambda: cl.grid_sub(a, a, weights=[0.9] * size))
refused("add shapes", "shapes differ", lambda: cl.grid_add(a, b))
refused("add transpose", "shapes differ", lambda: cl.grid_sub(a, a, transpose_b=True))
refused("float64", "unsupported dtype", lambda: cl.grid_matmul(a.astype(np.float64), b))
refused("1-D", "expected a 2-D matrix", lambda: cl.grid_matmul(a[0], b))
refused("flag", "transpose_a", lambda: cl.grid_matmul(a, b, transpose_a="yes"))
refused("missing file", "not found", lambda: cl.grid_matmul("/nonexistent/a.npy", b))
A = cl.shard(a)
refused("cluster matrix", "gather()", lambda: cl.grid_matmul(A, b))
A.free()
matmul_case("after refusals", a, a64, b, b64, False, False, True, "float32", "numpy", "float32")

t.finish()
