"""Backend conformance: every backend available here against float64 numpy.

Each case uploads operands, runs one op on the device and downloads the result;
the reference uses the very values the backend was given (after rounding to the
dtype, or to the quantisation grid), so the tolerance only covers arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
from backend_cases import CASES

from cmatrix import backends
from cmatrix.core import quant
from cmatrix.core.dtypes import SUPPORTED, from_float32, promote, to_float32

# Relative to |op(a)| @ |op(b)| per output element (the scale of a dot product's rounding).
TOL = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
# ggml multiplies quantised weights with activations rounded to q8_0 (8 bits per value).
QUANT_TOL = 1.2e-2


SHAPES = [(1, 37, 5), (13, 7, 29), (33, 64, 17), (2, 96, 130)]  # (m, k, n)


@pytest.fixture(scope="module", params=CASES)
def backend(request):
    name, accel, label = request.param
    be = backends.create(name, device_index=0, threads=1, accel=accel)
    if label == "torch-cpu-device-blocks":  # as CMATRIX_TORCH_BLOCKS=device does
        be._device_blocks = True
    if accel and name == "torch":
        assert be.device.startswith("cuda"), be.fallback
    return be


def _values(rng, shape, dtype):
    """Random data of ``dtype``: (storage, float64 values it holds)."""
    stored = from_float32(rng.standard_normal(shape).astype(np.float32), dtype)
    return stored, to_float32(stored, dtype).astype(np.float64)


def _close(got, ref, scale, tol):
    err = np.abs(got - ref)
    bound = tol * scale + 1e-30
    worst = float(np.max(err / bound))
    assert worst <= 1.0, f"error {worst:.2f}x the tolerance ({float(err.max()):.3g} max)"


@pytest.mark.parametrize("dtype", SUPPORTED)
def test_upload_download_roundtrip(backend, dtype):
    rng = np.random.default_rng(1)
    stored, _ = _values(rng, (5, 33), dtype)
    got = backend.download(backend.upload(stored, dtype), dtype)
    assert got.dtype == stored.dtype and got.shape == stored.shape
    np.testing.assert_array_equal(got, stored)


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul(backend, dtype, transpose_a, transpose_b, m, k, n):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a_shape = (k, m) if transpose_a else (m, k)
    b_shape = (n, k) if transpose_b else (k, n)
    a, a64 = _values(rng, a_shape, dtype)
    b, b64 = _values(rng, b_shape, dtype)
    y = backend.matmul(backend.upload(a, dtype), backend.upload(b, dtype), transpose_a, transpose_b)
    got = to_float32(backend.download(y, dtype), dtype)
    opa, opb = (a64.T if transpose_a else a64), (b64.T if transpose_b else b64)
    assert got.shape == (m, n)
    _close(got, opa @ opb, np.abs(opa) @ np.abs(opb), TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_partial_products_stay_float32(backend, dtype):
    """Partial sums travel between ranks in float32: no rounding to the half type first."""
    rng = np.random.default_rng(5)
    a, a64 = _values(rng, (4, 64), dtype)
    b, b64 = _values(rng, (64, 9), dtype)
    y = backend.matmul_float32(backend.upload(a, dtype), backend.upload(b, dtype))
    _close(backend.download(y, "float32"), a64 @ b64, np.abs(a64) @ np.abs(b64), TOL["float32"])


@pytest.mark.parametrize("a_dtype,b_dtype", [("float32", "float16"), ("float16", "bfloat16"),
                                             ("bfloat16", "float32")])
def test_matmul_mixed_dtypes(backend, a_dtype, b_dtype):
    rng = np.random.default_rng(7)
    a, a64 = _values(rng, (3, 40), a_dtype)
    b, b64 = _values(rng, (40, 11), b_dtype)
    out = promote(a_dtype, b_dtype)
    y = backend.matmul(backend.upload(a, a_dtype), backend.upload(b, b_dtype))
    got = to_float32(backend.download(y, out), out)
    # The result is float32, but a backend may compute in the narrower input type.
    _close(got, a64 @ b64, np.abs(a64) @ np.abs(b64), max(TOL[a_dtype], TOL[b_dtype]))


@pytest.mark.parametrize("dtype", SUPPORTED)
@pytest.mark.parametrize("kind", ["add", "sub"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 33)])
def test_add_sub(backend, dtype, kind, shape):
    rng = np.random.default_rng(shape[0] + shape[1])
    a, a64 = _values(rng, shape, dtype)
    b, b64 = _values(rng, shape, dtype)
    op = backend.add if kind == "add" else backend.sub
    got = to_float32(backend.download(op(backend.upload(a, dtype), backend.upload(b, dtype)), dtype),
                     dtype)
    ref = a64 + b64 if kind == "add" else a64 - b64
    # One rounding of the exact sum to the dtype: half an ulp.
    expected = to_float32(from_float32(ref.astype(np.float32), dtype), dtype)
    np.testing.assert_allclose(got, expected, rtol=TOL[dtype], atol=TOL[dtype] * 1e-3)
    if kind == "sub":  # the seed's BLAS path computed a + b for both
        assert not np.allclose(got, a64 + b64, atol=1e-3)


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("m", [1, 5])
def test_quantised_matmul(backend, kind, transpose_b, m):
    """A quantised weight multiplies like numpy on its dequantised values."""
    rng = np.random.default_rng(11)
    k, n = 96, 45
    w = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    axis = 1 if transpose_b else 0  # blocks run along the contracted axis
    assert backend.supports("matmul", kind, (n, k))
    wq = backend.upload(w, "float32", quant=kind, quant_axis=axis)
    dequantised = quant.roundtrip(w, kind, axis).astype(np.float64)
    np.testing.assert_array_equal(backend.download(wq, "float32"), dequantised.astype(np.float32))
    got = backend.download(backend.matmul(backend.upload(x, "float32"), wq, False, transpose_b),
                           "float32")
    w_op = dequantised.T if transpose_b else dequantised
    x64 = x.astype(np.float64)
    _close(got, x64 @ w_op, np.abs(x64) @ np.abs(w_op), QUANT_TOL)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_quantised_weights_keep_their_size(backend, kind):
    """Every backend keeps q8_0/q4_0 weights as blocks (1.06 / 0.56 bytes per value), a GPU
    torch rank on its device."""
    assert backend.stored_bytes("float32", kind) == quant.BLOCK_BYTES[kind] / quant.BLOCK
    w = np.random.default_rng(13).standard_normal((40, 64)).astype(np.float32)
    wq = backend.upload(w, "float32", quant=kind, quant_axis=1)
    if getattr(backend, "_device_blocks", False):
        assert type(wq).__name__ == "TorchBlocks" and wq.blocks.device == backend.torch_device
    if hasattr(wq, "nbytes") and hasattr(wq, "kind"):  # the host and device blocks of numpy/torch
        assert wq.nbytes == 40 * 64 // quant.BLOCK * quant.BLOCK_BYTES[kind]


@pytest.mark.parametrize("kind", quant.KINDS)
def test_quantised_weight_times_a_transposed_16_bit_activation(backend, kind):
    """op(a) read through its transpose, in float16: the quantised path takes any operand a."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    a = rng.standard_normal((64, 3)).astype(np.float16)  # op(a) = a.T: 3 x 64
    wq = backend.upload(w, "float32", quant=kind, quant_axis=1)
    got = backend.download(backend.matmul(backend.upload(a, "float16"), wq, True, True), "float32")
    ref = a.astype(np.float64).T @ quant.roundtrip(w, kind, 1).astype(np.float64).T
    _close(got, ref, np.abs(a.astype(np.float64).T) @ np.abs(w.astype(np.float64).T), QUANT_TOL)
    with pytest.raises(Exception, match="axis"):  # blocks run along axis 1: not usable as w @ x
        backend.matmul(backend.upload(np.ones((3, 40), np.float32), "float32"), wq, False, False)


def test_capabilities(backend):
    assert backend.supports("matmul", "float32", (4, 4))
    assert backend.supports("matmul", "q4_0", (3, 64))
    assert not backend.supports("matmul", "q8_0", (3, 40))  # rows are whole blocks of 32
    assert not backend.supports("conv2d", "float32", (4, 4))
    facts = backend.describe()
    assert facts["device"] and (facts["memory"] is None or facts["memory"] > 0)


def test_free_then_reuse(backend):
    rng = np.random.default_rng(3)
    a, a64 = _values(rng, (4, 8), "float32")
    handle = backend.upload(a, "float32")
    backend.free(handle)
    again = backend.upload(a, "float32")  # device memory is usable after a free
    np.testing.assert_array_equal(backend.download(again, "float32"), a)
