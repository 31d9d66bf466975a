"""Node-side operations on every layout against float64 numpy references.

Run: mpiexec -n N python -m cmatrix run tests/jobs/node_ops_job.py '[w0, ...]' ['["numpy", ...]']
Prints "node-ops: K checks, 0 failures on N ranks"; exits non-zero on a mismatch.
"""

import json
import math
import sys

import numpy as np
from tally import Tally

import cmatrix as cm

weights = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
names = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
cl = cm.init(weights=weights, backends=names)
rng = np.random.default_rng(11)
t = Tally("node-ops", cl)
erf = np.vectorize(math.erf)
refused = t.refused


def expect(name, got, want, rtol=2e-5):
    t.close(name, got, want, rtol)


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def rms(x, w, eps, axis):
    out = x / np.sqrt((x ** 2).mean(axis=axis, keepdims=True) + eps)
    return out if w is None else out * (w if axis == 1 else w[:, None])


def layer_norm(x, w, b, eps, axis):
    centred = x - x.mean(axis=axis, keepdims=True)
    out = centred / np.sqrt((centred ** 2).mean(axis=axis, keepdims=True) + eps)
    if w is not None:
        out = out * (w if axis == 1 else w[:, None])
    return out if b is None else out + (b if axis == 1 else b[:, None])


def rope(x, pos, d, theta=10000.0, interleaved=False):
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    out = x.copy()
    for h in range(x.shape[1] // d):
        head = x[:, h * d:(h + 1) * d]
        a, b = (head[:, 0::2], head[:, 1::2]) if interleaved else (head[:, : d // 2], head[:, d // 2:])
        ra, rb = a * cos - b * sin, b * cos + a * sin
        if interleaved:
            out[:, h * d:(h + 1) * d][:, 0::2], out[:, h * d:(h + 1) * d][:, 1::2] = ra, rb
        else:
            out[:, h * d:(h + 1) * d] = np.concatenate([ra, rb], axis=1)
    return out


def attention(q, k, v, d, scale, mask=None, causal=False):
    sq, sk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    out = np.zeros_like(q)
    for h in range(q.shape[1] // d):
        g = h // rep
        s = q[:, h * d:(h + 1) * d] @ k[:, g * d:(g + 1) * d].T * scale
        if mask is not None:
            s = s + mask
        if causal:
            s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
        out[:, h * d:(h + 1) * d] = softmax(s, 1) @ v[:, g * d:(g + 1) * d]
    return out


D = 8
x = rng.standard_normal((7, 6 * D)).astype(np.float32)
x64 = x.astype(np.float64)
w_row = rng.standard_normal(x.shape[1]).astype(np.float32)
b_row = rng.standard_normal(x.shape[1]).astype(np.float32)
layouts = {
    "array": lambda: x,
    "rows": lambda: cl.shard(x, axis=0),
    "columns": lambda: cl.shard(x, axis=1, align=D),  # whole heads per rank
    "replicated": lambda: cl.replicate(x),
}
for layout, make in layouts.items():
    m = make()
    expect(f"silu/{layout}", cl.silu(m), x64 / (1 + np.exp(-x64)))
    expect(f"gelu/{layout}", cl.gelu(m), 0.5 * x64 * (1 + erf(x64 / math.sqrt(2))))
    tanh_form = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    expect(f"gelu tanh/{layout}", cl.gelu(m, approximate="tanh"), tanh_form)
    for axis in (0, 1):
        expect(f"softmax axis {axis}/{layout}", cl.softmax(m, axis=axis), softmax(x64, axis))
    expect(f"rms_norm/{layout}", cl.rms_norm(m, w_row, eps=1e-5), rms(x64, w_row, 1e-5, 1))
    expect(f"rms_norm axis 0/{layout}", cl.rms_norm(m, axis=0), rms(x64, None, 1e-6, 0))
    expect(f"layer_norm/{layout}", cl.layer_norm(m, w_row, b_row), layer_norm(x64, w_row, b_row, 1e-5, 1))
    expect(f"layer_norm axis 0/{layout}", cl.layer_norm(m, axis=0, eps=1e-3),
           layer_norm(x64, None, None, 1e-3, 0))
    pos = np.arange(3, 3 + x.shape[0])
    for inter in (False, True):
        expect(f"rope interleaved={inter}/{layout}", cl.rope(m, pos, D, interleaved=inter),
               rope(x64, pos, D, interleaved=inter), rtol=1e-5)
    expect(f"repeat_kv/{layout}", cl.repeat_kv(m, D, 3),
           np.repeat(x64.reshape(7, 6, D), 3, axis=1).reshape(7, 18 * D))
    if isinstance(m, cm.Matrix):  # results kept where they were computed, then chained
        kept = cl.softmax(cl.silu(m, out="keep"), axis=1, out="keep")
        t.check(f"keep/{layout}", type(kept) is type(m), f"a {type(m).__name__} gave a {type(kept).__name__}")
        expect(f"keep chain/{layout}", kept.gather(), softmax(x64 / (1 + np.exp(-x64)), 1))
        kept.free()
        m.free()

# Attention: 4 query heads over 2 key/value heads, split in whole groups.
q = rng.standard_normal((5, 4 * D)).astype(np.float32)
k = rng.standard_normal((9, 2 * D)).astype(np.float32)
v = rng.standard_normal((9, 2 * D)).astype(np.float32)
q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
mask = np.where(rng.random((5, 9)) < 0.2, -np.inf, rng.standard_normal((5, 9))).astype(np.float32)
mask[:, 0] = 0  # every query sees at least one key
scale = 1 / math.sqrt(D)
expect("attention", cl.attention(q, k, v, D), attention(q64, k64, v64, D, scale))
expect("attention mask+scale", cl.attention(q, k, v, D, scale=0.3, mask=mask),
       attention(q64, k64, v64, D, 0.3, mask.astype(np.float64)))
expect("attention causal (decode: Sq < Sk)", cl.attention(q, k, v, D, causal=True),
       attention(q64, k64, v64, D, scale, causal=True))
expect("attention boolean mask", cl.attention(q, k, v, D, mask=np.isfinite(mask)),
       attention(q64, k64, v64, D, scale, np.where(np.isfinite(mask), 0.0, -np.inf)))
Q, K, V = cl.shard(q, axis=1, align=2 * D), cl.shard(k, axis=1, align=D), cl.shard(v, axis=1, align=D)
# the weights of every run here split heads alike
t.check("q split", Q.counts == tuple(2 * c for c in K.counts),
        f"{Q.counts} is not k's {K.counts} in groups of two heads")
expect("attention on sharded heads", cl.attention(Q, K, V, D, causal=True, out="keep").gather(),
       attention(q64, k64, v64, D, scale, causal=True))
qkv_self = rng.standard_normal((6, 2 * D)).astype(np.float32)
expect("self-attention causal (prefill)", cl.attention(qkv_self, qkv_self, qkv_self, D, causal=True),
       attention(*(qkv_self.astype(np.float64),) * 3, D, scale, causal=True))

# Refusals, before anything moves.
refused("rms weight length", "weight: expected a vector of length 48", lambda: cl.rms_norm(x, w_row[:5]))
refused("softmax axis", "axis: must be 0", lambda: cl.softmax(x, axis=2))
refused("layer_norm bias length", "bias: expected a vector of length 48",
        lambda: cl.layer_norm(x, None, b_row[:3]))
refused("layer_norm eps", "eps: a finite number", lambda: cl.layer_norm(x, eps=-1.0))
refused("gelu form", "approximate", lambda: cl.gelu(x, approximate="fast"))
refused("rope head_dim", "head_dim", lambda: cl.rope(x, np.arange(7), 7))
refused("rope theta", "theta: a finite number > 0", lambda: cl.rope(x, np.arange(7), D, theta=0.0))
refused("attention +inf mask", "+inf", lambda: cl.attention(q, k, v, D, mask=np.full((5, 9), np.inf)))
refused("rope positions", "positions: expected a vector of length 7", lambda: cl.rope(x, [1, 2], D))
refused("attention heads", "multiple of the key/value heads", lambda: cl.attention(q[:, :3 * D], k, v, D))
refused("attention mask shape", "mask: expected shape (5, 9)",
        lambda: cl.attention(q, k, v, D, mask=mask[:4]))
refused("attention v shape", "v: must have k's shape", lambda: cl.attention(q, k, v[:4], D))
if cl.size > 1:
    odd = cl.shard(x, axis=1, weights=[1 / cl.size] * cl.size)
    if any(c % D for c in odd.counts):
        refused("rope on split heads", "not in whole heads", lambda: cl.rope(odd, np.arange(7), D))
    odd.free()

t.finish()
