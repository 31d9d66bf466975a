"""Rotary embeddings, grouped-query repeat and attention through the Device layer, on every
backend available here, against float64 torch references written out by hand (the
layouts of transformers' ``apply_rotary_pos_emb`` / ``repeat_kv`` and of Meta's complex
rotation; transformers itself is not needed)."""

from __future__ import annotations

import numpy as np
import pytest
from backend_cases import DENSE_CASES
from test_node_ops import TOL, close, device_for, down, given, t64

from cmatrix.backends.device import Device
from cmatrix.core.dtypes import SUPPORTED

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=DENSE_CASES)
def dev(request) -> Device:
    return device_for(request.param)


def rope_tables(positions, head_dim, base=10000.0):
    """float32 cos/sin (rows, head_dim // 2) of Llama's rotary frequencies."""
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(positions, inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_reference(x64, cos, sin, head_dim, interleaved):
    rows, cols = x64.shape
    x = t64(x64).view(rows, cols // head_dim, head_dim)
    c, s = t64(cos)[:, None, :], t64(sin)[:, None, :]
    if interleaved:  # Meta: consecutive pairs are complex numbers, rotated by cos + i sin
        z = torch.view_as_complex(x.reshape(rows, -1, head_dim // 2, 2).contiguous())
        out = torch.view_as_real(z * torch.complex(c, s))
    else:  # transformers: q * cos + rotate_half(q) * sin, cos/sin repeated over both halves
        half = head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        out = x * torch.cat((c, c), dim=-1) + rotated * torch.cat((s, s), dim=-1)
    return out.reshape(rows, cols).numpy()


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope(dev, dtype, interleaved):
    rng = np.random.default_rng(21 + interleaved)
    rows, heads, head_dim = 6, 3, 8
    stored, x64 = given(rng, (rows, heads * head_dim), dtype, scale=2.0)
    cos, sin = rope_tables(np.arange(5, 5 + rows), head_dim)  # positions after a 5-token prefix
    y = dev.rope(dev.upload(stored, dtype), cos, sin, head_dim, interleaved)
    assert y.shape == stored.shape and y.dtype == "float32"
    got = down(dev, y)
    close(got, rope_reference(x64, cos, sin, head_dim, interleaved), np.abs(x64).max())
    other = rope_reference(x64, cos, sin, head_dim, not interleaved)  # the layouts really differ
    assert np.abs(got - other).max() > 100 * TOL * np.abs(x64).max()


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("n_rep", [1, 3])
def test_repeat_kv(dev, dtype, n_rep):
    rng = np.random.default_rng(n_rep)
    rows, kv, head_dim = 5, 2, 4
    stored, x64 = given(rng, (rows, kv * head_dim), dtype)
    y = dev.repeat_kv(dev.upload(stored, dtype), head_dim, n_rep)
    assert y.shape == (rows, kv * n_rep * head_dim)
    ref = torch.repeat_interleave(t64(x64).view(rows, kv, head_dim), n_rep, dim=1).reshape(rows, -1)
    np.testing.assert_array_equal(down(dev, y), ref.numpy())  # copies: exact


def attention_reference(q64, k64, v64, head_dim, scale, mask, causal):
    """Per head, in float64: softmax(q k^T * scale + mask) v; rows that see no key give zeros."""
    sq, sk = q64.shape[0], k64.shape[0]
    n_heads, n_kv = q64.shape[1] // head_dim, k64.shape[1] // head_dim
    q = t64(q64).view(sq, n_heads, head_dim)
    k, v = t64(k64).view(sk, n_kv, head_dim), t64(v64).view(sk, n_kv, head_dim)
    bias = torch.zeros(sq, sk, dtype=torch.float64) if mask is None else t64(mask)
    if causal:  # bottom-right: the last query sees every key
        for i in range(sq):
            bias[i, i + sk - sq + 1:] = -torch.inf
            if i + sk - sq < 0:
                bias[i] = -torch.inf
    out = torch.zeros(sq, n_heads, head_dim, dtype=torch.float64)
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        scores = q[:, h] @ k[:, g].T * scale + bias
        p = torch.softmax(scores, dim=-1)
        out[:, h] = torch.nan_to_num(p, nan=0.0) @ v[:, g]
    return out.reshape(sq, -1).numpy()


# (id, query heads, kv heads, Sq, Sk, mask, causal)
ATTENTION = [
    ("mha", 2, 2, 5, 5, None, False),
    ("gqa", 4, 2, 6, 6, None, False),
    ("gqa-mask", 4, 2, 5, 7, "holes", False),
    ("causal", 4, 2, 6, 6, None, True),
    ("decode", 4, 2, 1, 9, None, True),
    ("chunk-causal", 4, 2, 2, 7, None, True),
    ("chunk-causal-mask", 4, 2, 3, 8, "holes", True),
    ("dead-row", 2, 1, 4, 6, "dead", False),
    ("causal-more-queries", 2, 2, 5, 3, None, True),  # the first two queries see no key
]


def make_mask(rng, kind, sq, sk):
    if kind is None:
        return None
    mask = (rng.standard_normal((sq, sk)) * 0.5).astype(np.float32)
    mask[rng.random((sq, sk)) < 0.3] = -np.inf
    mask[:, -1] = 0  # keep a key visible (also to the causal rows)...
    if kind == "dead":
        mask[2] = -np.inf  # ...except in this row
    return mask


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("case", [pytest.param(c[1:], id=c[0]) for c in ATTENTION])
def test_attention(dev, dtype, case):
    n_heads, n_kv, sq, sk, mask_kind, causal = case
    rng = np.random.default_rng(sq * 10 + sk)
    head_dim, scale = 8, 0.4
    q, q64 = given(rng, (sq, n_heads * head_dim), dtype, scale=1.5)
    k, k64 = given(rng, (sk, n_kv * head_dim), dtype, scale=1.5)
    v, v64 = given(rng, (sk, n_kv * head_dim), dtype)
    mask = make_mask(rng, mask_kind, sq, sk)
    y = dev.attention(dev.upload(q, dtype), dev.upload(k, dtype), dev.upload(v, dtype), head_dim, scale,
                      mask=mask, causal=causal)
    assert y.shape == (sq, n_heads * head_dim) and y.dtype == "float32"
    got = down(dev, y)
    ref = attention_reference(q64, k64, v64, head_dim, scale, mask, causal)
    close(got, ref, np.abs(v64).max())  # outputs are convex combinations of rows of v
    dead = np.all(ref == 0, axis=1)
    if mask_kind == "dead" or (causal and sq > sk):
        assert dead.sum() == (1 if mask_kind == "dead" else sq - sk)
        assert (got[dead] == 0).all()
    else:
        assert not dead.any()
