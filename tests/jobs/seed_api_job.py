"""The seed API beyond the README's blocks, against torch in float64: grid mode (square and
non-square, both variants, transposes, add/sub), inner-split weights, sub, node ops
through cluster_matrix, and every error of the cluster lists on a multi-rank job.

Run: mpiexec -n N python seed_api_job.py '[backend, ...]' '[share, ...]'   (plain: every rank runs it)
Prints "seed-api: K checks, 0 failures on N ranks"; exits non-zero on any failure.
"""

import json
import sys

import torch
from tally import Tally

from cmatrix import CacheError, cluster_matrix

BACKENDS = json.loads(sys.argv[1])
SHARES = json.loads(sys.argv[2])
N = len(BACKENDS)
IPS = ["127.0.0.1"] * N
t = Tally("seed-api")
torch.manual_seed(5)


def make(data, split=False, dim=1, setup=(1, "save"), name=None, **lists):
    kw = dict(node_IP_list=IPS, CPU_GPU_select_list=[True] * N, node_percentages=SHARES,
              back_end_select_list=BACKENDS)
    kw.update(lists)
    return cluster_matrix(matrix_file_path=data, split_matrix=split, dim=dim, auto_set_up=list(setup),
                          matrix_name=name, **kw)


def expect(name, got, want, rtol=1e-4):
    t.close(name, got, want, rtol, kind="torch")


first = make(torch.ones(2, 2))  # starts the cluster: the other ranks serve from here on
cl = t.cl = first.cluster
refused = t.refused


# ---- errors of the cluster lists (item 2 of the issue) --------------------------------------
x = torch.randn(6, 4)
refused("foreign IP", "node_IP_list does not match", lambda: make(x, node_IP_list=["10.255.255.1"] * N))
refused("IP list short", "node_IP_list has", lambda: make(
    x, node_IP_list=IPS[:-1] or ["a", "b"], CPU_GPU_select_list=[True] * max(N - 1, 2),
    node_percentages=[1 / max(N - 1, 2)] * max(N - 1, 2), back_end_select_list=["numpy"] * max(N - 1, 2)))
refused("lists differ", "same length", lambda: make(x, CPU_GPU_select_list=[True] * (N + 1)))
refused("percentages 0.95", "sum to 0.95", lambda: make(x, node_percentages=[0.95 / N] * N))
refused("percentages 0.3", "sum to 0.3", lambda: make(x, node_percentages=[0.3 / N] * N))
other = ["numpy"] * N if BACKENDS != ["numpy"] * N else ["numpy"] * (N - 1) + ["torch"]
refused("other backends", "already runs", lambda: make(x, back_end_select_list=other))
refused("dim", "dim: must be 0", lambda: make(x, split=True, dim=2, setup=(1, "saveC"), name="d"))
refused("grid load of nothing kept", "no grid matrix named",
        lambda: make(None, setup=(2, "load"), name="never"), error=CacheError)

# ---- System 1: weights split along the inner dimension, sub --------------------------------
a, w = torch.randn(40, 5), torch.randn(40, 24)
A = make(a)
W_inner = make(w.T.contiguous(), split=True, dim=1, setup=(1, "saveC"), name="w_inner")  # (24, 40)
expect("mul, B split along the inner dimension", A.cluster_shard_operation(W_inner, True, True, True),
       a.double().T @ w.double())
P, Q = make(w, split=True, dim=0, setup=(1, "saveC"), name="p"), make(w * 3, True, 0, (1, "saveC"), "q")
expect("sub", P.cluster_shard_operation(Q, False, False, True, "sub"), -2 * w.double())
kept = P.cluster_shard_operation(Q, False, False, False, "sub")
expect("sub kept, then added", kept.cluster_shard_operation(P, False, False, True, "add"), -w.double())

# ---- grid mode (System 2) ------------------------------------------------------------------
for m, k, n in ((32, 32, 32), (17, 40, 9), (5, 64, 33)):
    ga, gb = torch.randn(m, k), torch.randn(k, n)
    GA, GB = make(ga, setup=(2, "save")), make(gb, setup=(2, "save"))
    want = ga.double() @ gb.double()
    expect(f"grid {m}x{k}x{n}", GA.cluster_shard_operation(GB, False, False, True), want)
    GL = make(ga, setup=(2, "load"), name=f"ga{m}")  # reloaded from its data, then kept under its name
    expect(f"grid load {m}x{k}x{n}", GL.cluster_shard_operation(GB, False, False, True), want)
    expect(f"grid load by name {m}x{k}x{n}",
           make(None, setup=(2, "load"), name=f"ga{m}").cluster_shard_operation(GB, False, False, True), want)
    expect(f"grid inner {m}x{k}x{n}", GA.cluster_shard_operation(GB, False, False, True, inner=True), want)
    GAT, GBT = make(ga.T.contiguous(), setup=(2, "save")), make(gb.T.contiguous(), setup=(2, "save"))
    expect(f"grid transposed {m}x{k}x{n}", GAT.cluster_shard_operation(GBT, True, True, True), want)
    expect(f"grid inner transposed {m}x{k}x{n}",
           GAT.cluster_shard_operation(GBT, True, True, True, inner=True, grid=(1, N)), want)
    # add/sub: operands of one shape are added as given (the seed's TransposeB=True is a layout
    # hint there); B stored transposed (another shape) is transposed back by the flag
    g64 = ga.double()
    want_add, want_sub = (g64 + g64.T, g64 - g64.T) if m == k else (2 * g64, 0 * g64)
    expect(f"grid add {m}x{k}", GA.cluster_shard_operation(GAT, False, True, True, "add"), want_add)
    expect(f"grid sub {m}x{k}", GA.cluster_shard_operation(GAT, False, True, True, "sub"), want_sub)
refused("grid with system 1", "both matrices must be created", lambda: A.cluster_shard_operation(GB, 0, 0, 1))
b_full = torch.randn(40, 7)
B_full = make(b_full)
if N == 1:  # single-node mode: B need not be split, and the result comes back whatever send_back says
    expect("single node, B not split", A.cluster_shard_operation(B_full, True, False, False),
           a.double().T @ b_full.double())
else:
    refused("B not split", "must be split", lambda: A.cluster_shard_operation(B_full, True, False, True))
refused("inner in system 1", "grid mode", lambda: A.cluster_shard_operation(W_inner, 1, 1, 1, inner=True))

# ---- node ops through cluster_matrix ---------------------------------------------------------
h = torch.randn(7, 48)
hd = h.double()
for split, dim in ((True, 1), (True, 0), (False, 0)):
    H = make(h, split=split, dim=dim, setup=(1, "saveC"), name=f"h{split}{dim}")
    tag = f"split={split} dim={dim}"
    expect(f"silu {tag}", H.silu(), torch.nn.functional.silu(hd))
    expect(f"gelu {tag}", H.gelu(), torch.nn.functional.gelu(hd))
    expect(f"softmax {tag}", H.softmax(), torch.softmax(hd, -1))
    expect(f"softmax dim 0 {tag}", H.softmax(dim=0), torch.softmax(hd, 0))
    ln = torch.rand(48) + 0.5
    expect(f"rms_norm {tag}", H.rms_norm(ln, eps=1e-5),
           hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5) * ln.double())
    chained = H.silu(send_back=False).softmax(send_back=False)
    expect(f"kept and chained {tag}", chained.send_back(), torch.softmax(torch.nn.functional.silu(hd), -1))

# Attention: 4 query heads, 2 key/value heads of 8; GQA directly and via repeat.
D, sq, sk = 8, 3, 6
q, k, v = torch.randn(sq, 4 * D), torch.randn(sk, 2 * D), torch.randn(sk, 2 * D)
qh = q.double().reshape(sq, 4, D).transpose(0, 1)
kh = k.double().reshape(sk, 2, D).transpose(0, 1).repeat_interleave(2, 0)
vh = v.double().reshape(sk, 2, D).transpose(0, 1).repeat_interleave(2, 0)


def sdpa(mask=None, scale=None):
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(sq, 4 * D)


Qc, Kc, Vc = make(q, setup=(1, "save")), make(k, setup=(1, "save")), make(v, setup=(1, "save"))
expect("cluster_flash_attn", Qc.cluster_flash_attn(Kc, Vc, D), sdpa())
causal = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)  # bottom-right: the decode layout
expect("cluster_flash_attn causal", Qc.cluster_flash_attn(Kc, Vc, D, causal=True), sdpa(causal))
additive = torch.randn(sq, sk)
expect("cluster_flash_attn mask+scale", Qc.cluster_flash_attn(Kc, Vc, D, scale=0.25, mask=additive),
       sdpa(additive.double(), 0.25))
K_rep = make(k).repeat(2, D, send_back=False)  # stays on the cluster, replicated
V_rep = make(v, split=True, dim=0, setup=(1, "saveC"), name="v_rep").repeat(2, D)  # a tensor
expect("repeat (GQA by copies)", Qc.cluster_flash_attn(K_rep, V_rep, D), sdpa())
# Split by the percentages alone (not on whole heads): re-split by heads for the call.
Qs, Ks, Vs = (make(t, split=True, dim=1, setup=(1, "saveC"), name=f"{n}_split")
              for n, t in (("q", q), ("k", k), ("v", v)))
expect("cluster_flash_attn on split matrices", Qs.cluster_flash_attn(Ks, Vs, D, causal=True), sdpa(causal))
pos = torch.arange(10, 10 + sq)
roped = Qc.rope(pos, D)
inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
ang = pos.double()[:, None] * inv[None, :]
qd = q.double().reshape(sq, 4, D)
x1, x2 = qd[..., : D // 2], qd[..., D // 2:]
cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
want_rope = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(sq, 4 * D)
expect("rope", roped, want_rope)
expect("rope on a split matrix", Qs.rope(pos, D), want_rope)
expect("repeat on a split matrix", Ks.repeat(2, D), k.double().reshape(sk, 2, 1, D).expand(sk, 2, 2, D)
       .reshape(sk, 4 * D))
refused("attention mask on split matrices", "mask: expected shape",  # checked before fetching
        lambda: Qs.cluster_flash_attn(Ks, Vs, D, mask=torch.zeros(2, 2)))
three_heads = make(q[:, : 3 * D])
refused("attention heads", "multiple of the key/value heads",
        lambda: three_heads.cluster_flash_attn(Kc, Vc, D))

t.finish(N)
