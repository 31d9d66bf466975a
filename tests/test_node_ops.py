"""Node-side operations through the Device layer, on every backend available here.

Activations, the pieces of a softmax and an RMSNorm split across ranks, transpose,
empty blocks and shape errors (rope, repeat_kv and attention: test_node_ops_attention.py).
Each case uploads blocks with ``Device.upload``, runs the op and downloads float32; the
reference is torch in float64 on the very values the backend was given (rounded to the dtype).
"""

from __future__ import annotations

import numpy as np
import pytest
from backend_cases import DENSE_CASES

from cmatrix import backends
from cmatrix.backends import host_ops
from cmatrix.backends.base import Backend
from cmatrix.backends.catalog import NODE_OPS
from cmatrix.backends.device import Block, Device
from cmatrix.core.dtypes import SUPPORTED, from_float32, to_float32
from cmatrix.errors import CMatrixError, InputError

torch = pytest.importorskip("torch")
F = torch.nn.functional

# One tolerance for every dtype, relative to the magnitude of what is computed: the node
# operations widen half-precision blocks exactly and compute and return float32, and the
# reference starts from the same rounded values. So float16/bfloat16 need no looser bound,
# and a backend that rounded anything to its half type (errors ~1e-3) fails, as it should.
TOL = 1e-5


def device_for(case: tuple) -> Device:
    """A Device on backend case (name, accel); an accelerated torch case must be on CUDA."""
    name, accel = case[:2]
    be = backends.create(name, device_index=0, threads=1, accel=accel)
    if accel and name == "torch":
        assert be.device.startswith("cuda"), be.fallback
    return Device(be)


@pytest.fixture(scope="module", params=DENSE_CASES)
def dev(request) -> Device:
    return device_for(request.param)


def given(rng, shape, dtype, scale=1.0, extra=None):
    """Storage of ``dtype`` and the float64 values it holds; ``extra`` fills the first entries."""
    x32 = (rng.standard_normal(shape) * scale).astype(np.float32)
    if extra is not None:
        x32.flat[: len(extra)] = extra
    stored = from_float32(x32, dtype)
    return stored, to_float32(stored, dtype).astype(np.float64)


def down(dev: Device, block: Block) -> np.ndarray:
    out = dev.download(block, "float32")
    assert out.dtype == np.float32 and out.shape == block.shape
    return out.astype(np.float64)


def close(got, ref, scale, tol=TOL):
    """|got - ref| <= tol * scale element-wise (exact where the scale is 0); no NaN anywhere."""
    assert got.shape == ref.shape
    assert not np.isnan(got).any(), "NaN in the result"
    err = np.abs(got - ref)
    err[got == ref] = 0  # equal infinities
    ratio = err / (tol * scale + 1e-300)
    assert float(ratio.max(initial=0)) <= 1.0, f"error {ratio.max():.2f}x the tolerance ({err.max():.3g} max)"


def t64(values: np.ndarray):
    return torch.from_numpy(np.asarray(values, dtype=np.float64))


def test_host_erf_accuracy():
    """The host gelu's erf (no scipy here) against the C library's, in float64."""
    import math

    x = np.concatenate([np.linspace(-8, 8, 40001), [-40.0, -26.5, 26.5, 1e3, 0.0, -0.0]])
    exact = np.array([math.erf(v) for v in x])
    assert np.abs(host_ops.erf(x) - exact).max() <= 1e-10
    tails = np.linspace(0, 12, 1201)
    exact_tails = np.array([math.erfc(v) for v in tails])
    np.testing.assert_allclose(host_ops.erfc_nonneg(tails), exact_tails, rtol=1e-9, atol=0)


EXTREMES = [-100.0, -30.0, -9.5, -3.0, -0.5, 0.0, 0.25, 2.0, 9.5, 30.0, 100.0]


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh"])
def test_activation(dev, dtype, kind):
    rng = np.random.default_rng(len(kind))
    stored, x64 = given(rng, (7, 45), dtype, scale=3.0, extra=EXTREMES)
    x = dev.upload(stored, dtype)
    y = dev.activation(x, kind)
    assert y.shape == (7, 45) and y.dtype == "float32"
    t = t64(x64)
    ref = {"silu": F.silu(t), "gelu": F.gelu(t), "gelu_tanh": F.gelu(t, approximate="tanh")}[kind]
    # |f'(x)| <= 1.13 for all three: an error relative to |x| is an error relative to the output
    close(down(dev, y), ref.numpy(), np.abs(x64))
    np.testing.assert_array_equal(dev.download(x, dtype), stored)  # the input block is untouched


def _split(stored, axis, at):
    return np.split(stored, [at], axis=axis)


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("at", [0, 5, 11])  # where the two "ranks" split the softmax axis (0: one is empty)
def test_softmax_split_across_ranks(dev, dtype, axis, at):
    rng = np.random.default_rng(100 * axis + at)
    shape = (6, 19) if axis == 1 else (19, 6)
    x32 = (rng.standard_normal(shape) * 3).astype(np.float32)
    line = (lambda i: (i, slice(None))) if axis == 1 else (lambda i: (slice(None), i))
    x32[line(1)][[0, 7, 12, 18]] = -np.inf  # masked entries, on both sides of every split
    x32[line(5)] = -np.inf  # a slice masked throughout
    x32[line(2)] += 40  # large values: the shift must be the global max
    stored = from_float32(x32, dtype)
    x64 = to_float32(stored, dtype).astype(np.float64)
    blocks = [dev.upload(part, dtype) for part in _split(stored, axis, at)]
    # what the driver does with an allreduce(max), then an allreduce(sum)
    top = np.maximum.reduce([dev.row_reduce(b, "max", axis) for b in blocks])
    np.testing.assert_array_equal(top, x64.max(axis=axis).astype(np.float32))
    total = sum(dev.row_reduce(b, "sumexp", axis, shift=top) for b in blocks)
    assert total.dtype == np.float32 and total.shape == (6,)
    got = np.concatenate([down(dev, dev.softmax_finish(b, top, total, axis)) for b in blocks], axis=axis)
    ref = torch.softmax(t64(x64), dim=axis).numpy()
    assert np.isnan(ref[line(5)]).all()
    ref[line(5)] = 0  # documented: a slice that is -inf throughout gives zeros, not NaN
    close(got, ref, ref)  # relative to each probability; masked entries exactly 0
    np.testing.assert_allclose(got.sum(axis=axis), [1, 1, 1, 1, 1, 0], rtol=1e-5)


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_split_across_ranks(dev, dtype, axis, weighted):
    rng = np.random.default_rng(7 + axis + 2 * weighted)
    length, eps = 24, 1e-5
    shape = (5, length) if axis == 1 else (length, 5)
    x32 = rng.standard_normal(shape).astype(np.float32)
    x32[(3, slice(None)) if axis == 1 else (slice(None), 3)] = 0  # eps keeps a zero slice finite
    x32[(4, slice(None)) if axis == 1 else (slice(None), 4)] *= 50
    stored = from_float32(x32, dtype)
    x64 = to_float32(stored, dtype).astype(np.float64)
    weight = (rng.standard_normal(length) + 1).astype(np.float32) if weighted else None
    parts, at = _split(stored, axis, 10), 10
    blocks = [dev.upload(p, dtype) for p in parts]
    sumsq = sum(dev.row_reduce(b, "sumsq", axis) for b in blocks)  # an allreduce(sum)
    exact = (x64 ** 2).sum(axis=axis)
    close(sumsq.astype(np.float64), exact, exact)
    mean_square = sumsq / np.float32(length)
    w_parts = [None, None] if weight is None else [weight[:at], weight[at:]]
    got = np.concatenate([down(dev, dev.rms_finish(b, mean_square, w, eps, axis))
                          for b, w in zip(blocks, w_parts, strict=True)], axis=axis)
    t = t64(x64)
    ref = t * torch.rsqrt((t ** 2).mean(dim=axis, keepdim=True) + eps)
    if weight is not None:
        ref = ref * (t64(weight)[None, :] if axis == 1 else t64(weight)[:, None])
    ref = ref.numpy()
    close(got, ref, np.abs(ref))


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_split_across_ranks(dev, dtype, axis, affine):
    """sum, then the sum of squares about the mean, over two blocks (each an allreduce), then
    layer_finish on each block: torch's layer_norm, also for a slice far from zero."""
    rng = np.random.default_rng(11 + axis + 2 * affine)
    length, eps = 24, 1e-5
    shape = (5, length) if axis == 1 else (length, 5)
    x32 = rng.standard_normal(shape).astype(np.float32)
    x32[(3, slice(None)) if axis == 1 else (slice(None), 3)] += 300  # E[x^2] - E[x]^2 would cancel
    x32[(4, slice(None)) if axis == 1 else (slice(None), 4)] = 2  # a constant slice: eps keeps it finite
    stored = from_float32(x32, dtype)
    x64 = to_float32(stored, dtype).astype(np.float64)
    weight = (rng.standard_normal(length) + 1).astype(np.float32) if affine else None
    bias = rng.standard_normal(length).astype(np.float32) if affine else None
    parts, at = _split(stored, axis, 10), 10
    blocks = [dev.upload(p, dtype) for p in parts]
    total = sum(dev.row_reduce(b, "sum", axis) for b in blocks)
    close(total.astype(np.float64), x64.sum(axis=axis), np.abs(x64).sum(axis=axis))
    mean = total / np.float32(length)
    centred = sum(dev.row_reduce(b, "sumsq", axis, shift=mean) for b in blocks)
    exact = ((x64 - np.expand_dims(mean, axis)) ** 2).sum(axis=axis)
    close(centred.astype(np.float64), exact, exact + 1e-6)
    variance = centred / np.float32(length)
    halves = [(None, None)] * 2 if not affine else [(weight[:at], bias[:at]), (weight[at:], bias[at:])]
    got = np.concatenate([down(dev, dev.layer_finish(b, mean, variance, w, c, eps, axis))
                          for b, (w, c) in zip(blocks, halves, strict=True)], axis=axis)
    t = t64(x64) if axis == 1 else t64(x64).T
    ref = F.layer_norm(t, (length,), None if weight is None else t64(weight),
                       None if bias is None else t64(bias), eps).numpy()
    ref = ref if axis == 1 else ref.T
    # the float32 mean of a slice far from zero is off by up to half an ulp of |x|, which the
    # normalisation scales by 1 / std: the bound is relative to |x| / std (times |weight|)
    std = np.sqrt(x64.var(axis=axis, keepdims=True) + eps)
    w_abs = 1 if weight is None else np.abs(np.expand_dims(weight.astype(np.float64), 1 - axis))
    close(got, ref, np.abs(x64) / std * w_abs + np.abs(ref) + 1)


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("shape", [(1, 7), (5, 3), (33, 64)])
def test_transpose(dev, dtype, shape):
    rng = np.random.default_rng(shape[0])
    stored, _ = given(rng, shape, dtype)
    x = dev.upload(stored, dtype)
    t = dev.transpose(x)
    assert t.shape == shape[::-1] and t.dtype == dtype  # exact values: the dtype is kept
    np.testing.assert_array_equal(dev.download(t, dtype), stored.T)
    np.testing.assert_array_equal(dev.download(x, dtype), stored)


def test_supports_node_ops(dev):
    for op in NODE_OPS:
        for dtype in dev.dtypes:
            assert dev.supports(op, dtype, (4, 64)), (op, dtype)
        assert not dev.supports(op, "q8_0", (4, 64))  # quantised blocks: matmul only
    assert dev.supports("matmul", "q4_0", (4, 64))
    assert not dev.supports("softmax", "float32", (4, 4))


class Refusing(Backend):
    """A backend that fails on any use: what reaches it is a bug (or a wrapped failure)."""

    name = "refusing"

    def upload_dense(self, data, dtype):
        raise AssertionError("an empty block reached the backend")

    def download(self, x, dtype):
        raise RuntimeError("boom")

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        raise AssertionError("reached the backend")

    add = sub = matmul


EMPTY_OPS = {
    "activation": lambda d, x, r, c: d.activation(x, "gelu"),
    "softmax_finish": lambda d, x, r, c: d.softmax_finish(x, np.zeros(r), np.ones(r), 1),
    "rms_finish": lambda d, x, r, c: d.rms_finish(x, np.ones(c), np.ones(r), 1e-6, 0),
    "rope": lambda d, x, r, c: d.rope(x, np.ones((r, 2)), np.zeros((r, 2)), 4),
    "repeat_kv": lambda d, x, r, c: d.repeat_kv(x, 4, 3),
    "transpose": lambda d, x, r, c: d.transpose(x),
}
EMPTY_SHAPES = {"activation": None, "softmax_finish": None, "rms_finish": None, "rope": None,
                "repeat_kv": lambda r, c: (r, 3 * c), "transpose": lambda r, c: (c, r)}


@pytest.mark.parametrize("op", sorted(EMPTY_OPS))
@pytest.mark.parametrize("shape", [(0, 8), (4, 0)])
def test_empty_blocks_never_reach_the_backend(op, shape):
    d = Device(Refusing())
    x = d.upload(np.zeros(shape, np.float32), "float32")
    out = EMPTY_OPS[op](d, x, *shape)
    expected = EMPTY_SHAPES[op](*shape) if EMPTY_SHAPES[op] else shape
    assert out.empty and out.shape == expected
    assert d.download(out, "float32").shape == expected


@pytest.mark.parametrize("kind,identity", [("max", -np.inf), ("sumexp", 0.0), ("sumsq", 0.0)])
def test_row_reduce_of_empty_block_is_the_identity(kind, identity):
    d = Device(Refusing())
    for shape, axis, n in [((0, 8), 0, 8), ((0, 8), 1, 0), ((4, 0), 1, 4), ((4, 0), 0, 0)]:
        got = d.row_reduce(d.upload(np.zeros(shape, np.float32), "float32"), kind, axis)
        assert got.dtype == np.float32 and got.shape == (n,)
        assert (got == identity).all()


def test_attention_with_empty_blocks():
    d = Device(Refusing())

    def empty(shape):
        return d.upload(np.zeros(shape, np.float32), "float32")

    out = d.attention(empty((3, 0)), empty((5, 0)), empty((5, 0)), 4, 0.5)  # a rank with no heads
    assert out.empty and out.shape == (3, 0)
    kv = Block("kv", (5, 8), "float32")  # never used: q is empty
    out = d.attention(empty((0, 8)), kv, kv, 4, 0.5, mask=np.zeros((0, 5)), causal=True)
    assert out.empty and out.shape == (0, 8)
    with pytest.raises(InputError, match="k/v are empty"):
        d.attention(Block("q", (3, 8), "float32"), empty((0, 8)), empty((0, 8)), 4, 0.5)


def _b(*shape):
    return Block("h", shape, "float32")  # a fake handle: validation must fail before any use


BAD = [
    ("activation", lambda d: d.activation(_b(2, 2), "relu"), "unknown kind"),
    ("row_reduce kind", lambda d: d.row_reduce(_b(2, 2), "mean", 1), "unknown kind"),
    ("row_reduce axis", lambda d: d.row_reduce(_b(2, 2), "max", 2), "axis must be 0 or 1"),
    ("row_reduce shift", lambda d: d.row_reduce(_b(2, 3), "sumexp", 1, np.zeros(3)), "length 2"),
    ("shift on max", lambda d: d.row_reduce(_b(2, 3), "max", 1, np.zeros(2)), "sumexp and sumsq only"),
    ("shift on sum", lambda d: d.row_reduce(_b(2, 3), "sum", 1, np.zeros(2)), "sumexp and sumsq only"),
    ("softmax total", lambda d: d.softmax_finish(_b(2, 3), np.zeros(3), np.ones(2), 0), "total.*length 3"),
    ("rms weight", lambda d: d.rms_finish(_b(2, 3), np.ones(2), np.ones(2), 1e-6, 1), "weight.*length 3"),
    ("rms 1-D", lambda d: d.rms_finish(_b(6), np.ones(1), None, 1e-6, 1), "2-D block"),
    ("rope cols", lambda d: d.rope(_b(2, 10), np.ones((2, 2)), np.ones((2, 2)), 4), "not a multiple"),
    ("rope odd", lambda d: d.rope(_b(2, 6), np.ones((2, 1)), np.ones((2, 1)), 3), "even"),
    ("rope cos", lambda d: d.rope(_b(2, 8), np.ones((2, 4)), np.ones((2, 2)), 4), r"cos.*\(2, 2\)"),
    ("rope sin", lambda d: d.rope(_b(3, 8), np.ones((3, 2)), np.ones((2, 2)), 4), r"sin.*\(3, 2\)"),
    ("repeat_kv n_rep", lambda d: d.repeat_kv(_b(2, 8), 4, 0), "n_rep"),
    ("repeat_kv head_dim", lambda d: d.repeat_kv(_b(2, 8), 0, 2), "head_dim"),
    ("attention groups", lambda d: d.attention(_b(2, 12), _b(5, 8), _b(5, 8), 4, 1.0), "3 query heads"),
    ("attention v", lambda d: d.attention(_b(2, 8), _b(5, 8), _b(4, 8), 4, 1.0), "v must have"),
    ("attention q cols", lambda d: d.attention(_b(2, 6), _b(5, 8), _b(5, 8), 4, 1.0), "q has 6 columns"),
    ("attention mask", lambda d: d.attention(_b(2, 8), _b(5, 8), _b(5, 8), 4, 1.0, np.zeros((2, 4))),
     r"mask.*\(2, 5\)"),
]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in BAD])
def test_shape_errors(call, message):
    with pytest.raises(InputError, match=message):
        call(Device(Refusing()))


def test_backend_failures_are_explained():
    explained = r"refusing .* failed in activation silu .*RuntimeError: boom"
    with pytest.raises(CMatrixError, match=explained) as e:
        Device(Refusing()).activation(_b(2, 2), "silu")
    assert not isinstance(e.value, InputError)
