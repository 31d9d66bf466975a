"""Every matmul/add/sub path against a float64 numpy reference.

Run: mpiexec -n N python -m cmatrix run tests/jobs/correctness.py '[w0, w1, ...]' ['["numpy", ...]']
(the optional second argument gives one backend per rank). Prints
"correctness: K checks, 0 failures on N ranks"; exits non-zero listing every failure.
"""

import itertools
import json
import sys

import numpy as np
from tally import Tally

import cmatrix as cm
from cmatrix.core import quant
from cmatrix.core.dtypes import bf16_to_float32, float32_to_bf16

try:
    import torch
except ImportError:
    torch = None

weights = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
backend_list = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
cl = cm.init(weights=weights, backends=backend_list)
print(cl.ranks)
rng = np.random.default_rng(cl.size)
# Relative to |op(a)| @ |op(b)|: float32 accumulation plus rounding of the output
# (the same per-dtype tolerances as the backend conformance suite).
RTOL = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2, "quant": 1.2e-2}
t = Tally("correctness", cl)


def make(shape, dtype):
    """(user array, its exact float64 values)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype == "float16":
        x = x.astype(np.float16)
        return x, x.astype(np.float64)
    if dtype == "bfloat16":
        bits = float32_to_bf16(x)
        exact = bf16_to_float32(bits).astype(np.float64)
        return torch.from_numpy(exact.astype(np.float32)).to(torch.bfloat16), exact
    return x, x.astype(np.float64)


def check(label, got, ref, scale, dtype, kind):
    t.close(label, got, ref, RTOL[dtype], scale, kind)


dtype_list = ["float32", "float16"] + (["bfloat16"] if torch is not None else [])
shapes = [(1, 1, 1), (1, 37, 1), (1, 64, 29), (7, 1, 13), (13, 17, 1), (31, 29, 37), (3, 64, 96)]

for dtype, (m, k, n) in itertools.product(dtype_list, shapes):
    kind = "torch" if dtype == "bfloat16" else "numpy"
    for ta, tb, axis in itertools.product((False, True), (False, True), (0, 1)):
        a, a64 = make((k, m) if ta else (m, k), dtype)
        b, b64 = make((n, k) if tb else (k, n), dtype)
        op_a, op_b = (a64.T if ta else a64), (b64.T if tb else b64)
        ref, scale = op_a @ op_b, np.abs(op_a) @ np.abs(op_b)
        B = cl.shard(b, weights=weights, axis=axis)
        label = f"{dtype} {m}x{k}x{n} ta={ta} tb={tb} axis={axis}"
        check(label, cl.matmul(a, B, transpose_a=ta, transpose_b=tb), ref, scale, dtype, kind)
        if dtype == "float32" or (m, k, n) == (31, 29, 37):
            kept = cl.matmul(a, B, transpose_a=ta, transpose_b=tb, out="keep")
            check(label + " keep", kept.gather(), ref, scale, dtype, kind)
            kept.free()
        B.free()

# b as a plain array (sharded on the fly), and a batched activation.
a, a64 = make((2, 5, 19), "float32")
b, b64 = make((19, 23), "float32")
check("on-the-fly b, 3-D a", cl.matmul(a, b), a64 @ b64, np.abs(a64) @ np.abs(b64), "float32", "numpy")

# Resident activations: a replicated (output split) or sharded like b's rows (inner split).
x, x64 = make((4, 40), "float32")
w, w64 = make((40, 24), "float32")
ref, scale = x64 @ w64, np.abs(x64) @ np.abs(w64)
X = cl.replicate(x)
W_cols = cl.shard(w, axis=1)
before = cl.stats()["bytes_moved"]
check("replicated a", cl.matmul(X, W_cols), ref, scale, "float32", "numpy")
moved = cl.stats()["bytes_moved"] - before
result_share = ref.shape[0] * (w.shape[1] - W_cols.counts[0]) * 4  # float32 columns off rank 0
t.check("replicated a", moved == result_share,
        f"moved {moved} bytes, expected only the result ({result_share})")
W_rows = cl.shard(w, axis=0)
H = cl.shard(x, axis=1, weights=list(np.array(W_rows.counts) / 40))
check("sharded a, inner split", cl.matmul(H, W_rows), ref, scale, "float32", "numpy")
# Chained: column-parallel then row-parallel with the intermediate left distributed.
v, v64 = make((24, 40), "float32")
V_rows = cl.shard(v, axis=0, weights=list(np.array(W_cols.counts) / 24))
mid = cl.matmul(X, W_cols, out="keep")
chain = x64 @ w64 @ v64
check("chained keep", cl.matmul(mid, V_rows), chain, np.abs(x64) @ np.abs(w64) @ np.abs(v64),
      "float32", "numpy")

# Shard-wise add and sub: sharded alike, one array, two arrays, kept results.
for dtype in dtype_list:
    kind = "torch" if dtype == "bfloat16" else "numpy"
    p, p64 = make((11, 7), dtype)
    q, q64 = make((11, 7), dtype)
    scale = np.abs(p64) + np.abs(q64)
    for axis in (0, 1):
        P, Q = cl.shard(p, axis=axis), cl.shard(q, axis=axis)
        check(f"add {dtype} axis={axis}", cl.add(P, Q), p64 + q64, scale, dtype, kind)
        check(f"sub {dtype} axis={axis}", cl.sub(P, Q), p64 - q64, scale, dtype, kind)
        check(f"sub array-b {dtype} axis={axis}", cl.sub(P, q), p64 - q64, scale, dtype, kind)
        kept = cl.add(p, Q, out="keep")
        check(f"add keep {dtype} axis={axis}", kept.gather(), p64 + q64, scale, dtype, kind)
    check(f"sub arrays {dtype}", cl.sub(p, q), p64 - q64, scale, dtype, kind)

# Partial products that cancel: rounding each rank's partial to the half type first
# (3*255 -> 764 in bfloat16) would give 2 or 4 instead of 3.
if torch is not None:
    for dtype in ("float16", "bfloat16"):
        a = torch.tensor([[3.0, -3.0]], dtype=getattr(torch, dtype))
        B = cl.shard(torch.tensor([[255.0], [254.0]], dtype=getattr(torch, dtype)), axis=0,
                     weights=weights)
        got = float(cl.matmul(a, B)[0, 0])
        t.check(f"cancelling partials {dtype}", got == 3.0, f"got {got}, expected 3")
        B.free()

# Quantised weights: blocks along the contracted axis, split either way (whole blocks per rank).
for kind, (axis, tb) in itertools.product(quant.KINDS, itertools.product((0, 1), (False, True))):
    k, n = 96, 70
    w = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    quant_axis = 1 if tb else 0
    W = cl.shard(w, weights=weights, axis=axis, quant=kind, quant_axis=quant_axis)
    label = f"{kind} axis={axis} transpose_b={tb}"
    if axis == quant_axis:
        t.check(label, not any(c % quant.BLOCK for c in W.counts), f"counts {W.counts} split a block")
    values = quant.roundtrip(w, kind, quant_axis).astype(np.float64)
    t.check(label, np.array_equal(np.asarray(W.gather()), values.astype(np.float32)),
            "gathered weight differs from its dequantised values")
    w_op, x64 = (values.T if tb else values), x.astype(np.float64)
    check(label, cl.matmul(x, W, transpose_b=tb), x64 @ w_op, np.abs(x64) @ np.abs(w_op), "quant", "numpy")
    wrong = x if tb else x[:, :70]
    t.refused(f"{label} wrong transpose", "transpose_b",
              lambda W=W, wrong=wrong, tb=tb: cl.matmul(wrong, W, transpose_b=not tb))
    W.free()

t.finish()
