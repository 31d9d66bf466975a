"""Node-side operations as numpy float32 kernels on the host (no MPI, no device).

These are the default implementations behind :class:`cmatrix.backends.base.Backend`'s
node operations (activations, the pieces of a split softmax, RMSNorm and LayerNorm, rotary
embeddings, grouped-query repeat, attention, transpose). Every function takes
float32 numpy arrays, never writes into its inputs (a numpy backend's download is
the resident array itself) and returns new float32 arrays.

Broadcasting convention: a *reduction* along ``axis`` of a 2-D block gives one value
per slice along the other axis, so such a vector (``shift``, ``total``,
``mean_square``) has length ``x.shape[1 - axis]`` and is broadcast along ``axis``.
"""

from __future__ import annotations

import numpy as np

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
REDUCTIONS = ("max", "sum", "sumexp", "sumsq")

# erfc(z) = t * exp(-z^2 + h(t)) with t = 1 / (1 + z / 2), z >= 0: h is smooth on t in (0, 1]
# and is held as a degree-16 Chebyshev series in u = 2t - 1. The coefficients are a
# least-squares fit of log(erfc(z) * exp(z^2) / t) against the C library's erfc on 20000
# points of z in [0, 26]; the relative error of erfc (so the absolute error of erf) is
# below 4e-11 everywhere, far inside float32.
_ERFC_CHEB = np.array([
    -0.6513268597909274, 0.6419697921604385, 0.019476473397369822, -0.009561514969740703,
    -0.0009465951702766571, 0.0003668393391441168, 4.252347066035917e-05, -2.027870521114411e-05,
    -1.624177529158726e-06, 1.3035630043606033e-06, 1.5705421843771036e-08, -8.529874694859669e-08,
    6.578823158273883e-09, 5.025140233489642e-09, -9.63567060090097e-10, -2.424508528569394e-10,
    1.1102964482722234e-10,
])
# The same polynomial in the power basis of u (coefficients below 0.7, so Horner's rule in
# float64 stays within ~1e-15 of the Chebyshev form), evaluated in place.
_ERFC_POLY = np.polynomial.chebyshev.cheb2poly(_ERFC_CHEB)
_ERFC_ZMAX = 26.0  # erfc(26) < 1e-295: beyond it erfc is 0 in double precision anyway


def erfc_nonneg(z: np.ndarray) -> np.ndarray:
    """erfc(z) for z >= 0 in float64, relative error below 4e-11."""
    z = np.minimum(np.asarray(z, dtype=np.float64), _ERFC_ZMAX)
    t = 1.0 / (1.0 + 0.5 * z)
    u = 2.0 * t - 1.0
    h = np.full_like(u, _ERFC_POLY[-1])
    for c in _ERFC_POLY[-2::-1]:
        h *= u
        h += c
    h -= z * z
    np.exp(h, out=h)
    h *= t
    return h


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, vectorised, in float64 (absolute error below 4e-11)."""
    x = np.asarray(x, dtype=np.float64)
    return np.copysign(1.0 - erfc_nonneg(np.abs(x)), x)


def activation(x: np.ndarray, kind: str) -> np.ndarray:
    """silu, gelu (exact, erf form) or gelu_tanh (torch's approximate="tanh") of ``x``."""
    if kind == "silu":
        with np.errstate(over="ignore"):  # exp(-x) -> inf for x < -88: x / inf = -0, as it should
            return (x / (1.0 + np.exp(-x))).astype(np.float32, copy=False)
    if kind == "gelu":
        # x * Phi(x) with Phi from erfc on both sides: accurate for large negative x too.
        z = x.astype(np.float64)
        half_tail = 0.5 * erfc_nonneg(np.abs(z) / np.sqrt(2.0))
        phi = np.where(z >= 0, 1.0 - half_tail, half_tail)
        return (z * phi).astype(np.float32)
    if kind == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): same function, no cancellation for negative x.
        u = np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
        with np.errstate(over="ignore"):
            return (x / (1.0 + np.exp(-2.0 * u))).astype(np.float32, copy=False)
    raise ValueError(f"unknown activation {kind!r}; one of {', '.join(ACTIVATIONS)}")


def safe_shift(shift: np.ndarray | None) -> np.ndarray | float:
    """A softmax shift with -inf (a slice that is -inf throughout) replaced by 0, so that
    exp(x - shift) is 0 there instead of NaN."""
    if shift is None:
        return 0.0
    return np.where(np.isneginf(shift), np.float32(0), shift).astype(np.float32, copy=False)


def row_reduce(x: np.ndarray, kind: str, axis: int, shift: np.ndarray | None = None) -> np.ndarray:
    """max / sum / sum of exp(x - shift) / sum of (x - shift)**2 of ``x`` along ``axis``
    (a float32 vector; sums accumulate in float64)."""
    if kind == "max":
        return np.max(x, axis=axis).astype(np.float32, copy=False)
    if kind == "sum":
        return np.sum(x, axis=axis, dtype=np.float64).astype(np.float32)
    s = safe_shift(shift)
    shifted = x - (np.expand_dims(s, axis) if isinstance(s, np.ndarray) else s)
    if kind == "sumexp":
        return np.sum(np.exp(shifted), axis=axis, dtype=np.float64).astype(np.float32)
    if kind == "sumsq":
        x64 = shifted.astype(np.float64)
        return np.einsum("ij,ij->j" if axis == 0 else "ij,ij->i", x64, x64).astype(np.float32)
    raise ValueError(f"unknown reduction {kind!r}; one of {', '.join(REDUCTIONS)}")


def softmax_finish(x: np.ndarray, shift: np.ndarray, total: np.ndarray, axis: int) -> np.ndarray:
    """exp(x - shift) / total; a slice whose total is 0 (all -inf) gives zeros."""
    e = np.exp(x - np.expand_dims(safe_shift(shift), axis))
    total = np.where(total > 0, total, np.float32(np.inf)).astype(np.float32, copy=False)
    return (e / np.expand_dims(total, axis)).astype(np.float32, copy=False)


def rms_finish(x: np.ndarray, mean_square: np.ndarray, weight: np.ndarray | None, eps: float,
               axis: int) -> np.ndarray:
    """x / sqrt(mean_square + eps) * weight (weight runs along ``axis``; None: no scaling)."""
    inv = (1.0 / np.sqrt(mean_square.astype(np.float32) + np.float32(eps))).astype(np.float32)
    y = x * np.expand_dims(inv, axis)
    if weight is not None:
        y = y * np.expand_dims(weight.astype(np.float32, copy=False), 1 - axis)
    return y.astype(np.float32, copy=False)


def layer_finish(x: np.ndarray, mean: np.ndarray, variance: np.ndarray, weight: np.ndarray | None,
                 bias: np.ndarray | None, eps: float, axis: int) -> np.ndarray:
    """(x - mean) / sqrt(variance + eps) * weight + bias: LayerNorm along ``axis`` (weight and
    bias run along ``axis``; None: no scaling, no shift)."""
    inv = (1.0 / np.sqrt(variance.astype(np.float32) + np.float32(eps))).astype(np.float32)
    y = (x - np.expand_dims(mean.astype(np.float32), axis)) * np.expand_dims(inv, axis)
    if weight is not None:
        y = y * np.expand_dims(weight.astype(np.float32, copy=False), 1 - axis)
    if bias is not None:
        y = y + np.expand_dims(bias.astype(np.float32, copy=False), 1 - axis)
    return y.astype(np.float32, copy=False)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, head_dim: int,
         interleaved: bool = False) -> np.ndarray:
    """Rotary embedding of every head of ``x`` (rows, heads * head_dim); cos/sin (rows, head_dim/2).

    Not interleaved: rotate_half pairs (i, i + head_dim/2), as Hugging Face Llama;
    interleaved: pairs (2i, 2i + 1), as GPT-J and Meta's original layout.
    """
    rows, cols = x.shape
    half = head_dim // 2
    c = cos.astype(np.float32, copy=False)[:, None, :]
    s = sin.astype(np.float32, copy=False)[:, None, :]
    if interleaved:
        pairs = x.reshape(rows, cols // head_dim, half, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = np.stack([a * c - b * s, b * c + a * s], axis=-1)
    else:
        heads = x.reshape(rows, cols // head_dim, head_dim)
        a, b = heads[..., :half], heads[..., half:]
        out = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    return out.reshape(rows, cols).astype(np.float32, copy=False)


def repeat_kv(x: np.ndarray, head_dim: int, n_rep: int) -> np.ndarray:
    """(rows, kv * head_dim) -> (rows, kv * n_rep * head_dim): output head h is input head h // n_rep."""
    rows, cols = x.shape
    heads = x.reshape(rows, cols // head_dim, head_dim)
    return np.repeat(heads, n_rep, axis=1).reshape(rows, cols * n_rep).astype(np.float32, copy=False)


def causal_allowed(sq: int, sk: int) -> np.ndarray:
    """(sq, sk) bool: query i sees key j <= i + (sk - sq) (bottom-right aligned, as a KV cache)."""
    return np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, head_dim: int, scale: float,
              mask: np.ndarray | None = None, causal: bool = False) -> np.ndarray:
    """softmax(q_h k_g^T * scale + mask) v_g per head h, with g = h // (H // Hkv).

    A query row that sees no key at all (every score -inf) gives zeros, not NaN.
    """
    sq, sk = q.shape[0], k.shape[0]
    n_heads, n_kv = q.shape[1] // head_dim, k.shape[1] // head_dim
    group = n_heads // n_kv
    # (Hkv, group * Sq, head_dim): the queries of one kv head stacked, one matmul per kv head
    qg = q.reshape(sq, n_kv, group, head_dim).transpose(1, 2, 0, 3).reshape(n_kv, group * sq, head_dim)
    kt = k.reshape(sk, n_kv, head_dim).transpose(1, 2, 0)  # (Hkv, head_dim, Sk)
    vg = v.reshape(sk, n_kv, head_dim).transpose(1, 0, 2)  # (Hkv, Sk, head_dim)
    scores = np.matmul(qg, kt).reshape(n_kv, group, sq, sk)
    scores *= np.float32(scale)
    if mask is not None:
        scores += mask.astype(np.float32, copy=False)
    if causal:
        scores = np.where(causal_allowed(sq, sk), scores, np.float32(-np.inf))
    top = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isneginf(top), np.float32(0), top))
    total = np.sum(e, axis=-1, keepdims=True)
    p = e / np.where(total > 0, total, np.float32(np.inf))
    out = np.matmul(p.reshape(n_kv, group * sq, sk), vg)  # (Hkv, group * Sq, head_dim)
    out = out.reshape(n_kv, group, sq, head_dim).transpose(2, 0, 1, 3)
    return np.ascontiguousarray(out.reshape(sq, n_heads * head_dim), dtype=np.float32)


def transpose(x: np.ndarray) -> np.ndarray:
    """A contiguous transposed copy of ``x`` (never a view, even of a one-row ``x``)."""
    return x.T.copy(order="C")
