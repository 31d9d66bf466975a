"""GGML backend specifics: quantised blocks, orientation rules, threads, buffer reuse."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

ggml = pytest.importorskip("ggml")

from cmatrix.backends import create  # noqa: E402
from cmatrix.core import quant  # noqa: E402
from cmatrix.errors import CMatrixError, InputError  # noqa: E402

GGML_TYPE = {"q8_0": ggml.GGML_TYPE_Q8_0, "q4_0": ggml.GGML_TYPE_Q4_0}


@pytest.fixture(scope="module")
def be():
    backend = create("ggml", threads=1, accel=False)
    yield backend
    backend.close()


def _ggml_quantize(x: np.ndarray, kind: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, n // quant.BLOCK * quant.BLOCK_BYTES[kind]), dtype=np.uint8)
    written = ggml.ggml_quantize_chunk(GGML_TYPE[kind], x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                       out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes
    return out


@pytest.mark.parametrize("kind", quant.KINDS)
def test_numpy_quantiser_matches_ggml(kind):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 128)).astype(np.float32) * 3
    x[0, :32] = 0                      # an all-zero block
    x[1, :32] = 1.0                    # all equal
    x[2, 32:64] = -x[2, 32:64]
    x[3, 5], x[3, 9] = 4.0, -4.0       # equal magnitudes: the first one wins
    x[4, 64:96] = rng.integers(-8, 8, 32) * 0.5  # exact ties at .5 steps
    np.testing.assert_array_equal(quant.quantize(x, kind), _ggml_quantize(x, kind))


def test_q4_0_row_length_40_refused(be):
    w = np.ones((40, 8), np.float32)
    with pytest.raises(InputError, match="multiple of 32, got 40"):
        be.upload(w, "float32", quant="q4_0", quant_axis=0)
    with pytest.raises(InputError, match="multiple of 32, got 40"):
        be.upload(w.T.copy(), "float32", quant="q4_0", quant_axis=1)


@pytest.mark.parametrize("axis", [0, 1])
def test_quantised_weight_wrong_transpose(be, axis):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    wq = be.upload(w, "float32", quant="q8_0", quant_axis=axis)
    x = be.upload(rng.standard_normal((2, 64)).astype(np.float32), "float32")
    with pytest.raises(CMatrixError, match="transpose_b"):
        be.matmul(x, wq, False, axis == 0)
    with pytest.raises(CMatrixError, match="only be the weight b"):
        be.matmul(wq, x, False, True)
    with pytest.raises(CMatrixError):
        be.add(wq, wq)
    be.matmul(x, wq, False, axis == 1)  # the matching orientation works


@pytest.mark.parametrize("kind", quant.KINDS)
def test_quantised_stored_as_blocks(be, kind):
    w = np.random.default_rng(4).standard_normal((64, 96)).astype(np.float32)
    wq = be.upload(w, "float32", quant=kind, quant_axis=1)
    (res,) = wq.weights.values()
    assert res.nbytes == 64 * 3 * quant.BLOCK_BYTES[kind]
    np.testing.assert_array_equal(be.download(wq, "float32"), quant.roundtrip(w, kind, 1))


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_honoured(threads):
    backend = create("ggml", threads=threads, accel=False)
    try:
        assert backend.threads == threads and backend.describe()["threads"] == threads
        rng = np.random.default_rng(threads)
        a = rng.standard_normal((9, 70)).astype(np.float32)
        b = rng.standard_normal((70, 11)).astype(np.float32)
        got = backend.download(backend.matmul(backend.upload(a, "float32"), backend.upload(b, "float32")),
                               "float32")
        np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4)
    finally:
        backend.close()


def test_device_and_fallback():
    cpu = create("llama", accel=False)
    assert cpu.device == "ggml cpu" and cpu.fallback is None
    cpu.close()
    accel = create("ggml", accel=True)
    gpus = [ggml.ggml_backend_dev_type(ggml.ggml_backend_dev_get(i))
            for i in range(ggml.ggml_backend_dev_count())]
    if ggml.GGML_BACKEND_DEVICE_TYPE_GPU not in gpus and ggml.GGML_BACKEND_DEVICE_TYPE_IGPU not in gpus:
        assert accel.fallback and "CPU" in accel.fallback and accel.device == "ggml cpu"
    accel.close()
    accel.close()  # idempotent


def test_allocator_reused(be):
    rng = np.random.default_rng(9)
    w = be.upload(rng.standard_normal((256, 128)).astype(np.float32), "float32")
    x = rng.standard_normal((8, 256)).astype(np.float32)
    be.matmul(be.upload(x, "float32"), w)
    size = be.compute_bytes
    assert size > 0
    for _ in range(20):
        be.matmul(be.upload(x, "float32"), w)
        assert be.compute_bytes == size
    small = be.upload(x[:2, :64].copy(), "float32")
    be.add(small, small)  # a smaller graph fits in the same buffer
    assert be.compute_bytes == size


def test_weight_cached_per_orientation(be):
    rng = np.random.default_rng(8)
    b = rng.standard_normal((33, 33)).astype(np.float16)
    x = rng.standard_normal((3, 33)).astype(np.float32)
    wb = be.upload(b, "float16")
    x16, b64 = x.astype(np.float16).astype(np.float64), b.astype(np.float64)
    for transpose_b in (False, True, False):
        y = be.download(be.matmul(be.upload(x, "float32"), wb, False, transpose_b), "float32")
        np.testing.assert_allclose(y, x16 @ (b64.T if transpose_b else b64), rtol=1e-3, atol=1e-3)
    assert set(wb.weights) == {False, True}
    np.testing.assert_array_equal(be.download(wb, "float16"), b)  # read back from the ggml tensor


def test_empty_shards_and_free(be):
    x = be.upload(np.ones((2, 64), np.float32), "float32")
    w = be.upload(np.ones((64, 0), np.float32), "float32")
    assert be.download(be.matmul(x, w), "float32").shape == (2, 0)
    wq = be.upload(np.ones((64, 0), np.float32), "float32", quant="q8_0", quant_axis=0)
    assert be.download(be.matmul(x, wq), "float32").shape == (2, 0)
    full = be.upload(np.ones((64, 4), np.float32), "float32")
    be.matmul(x, full)
    be.free(full)
    assert not full.weights
    with pytest.raises(CMatrixError, match="freed"):
        be.matmul(x, full)


def test_closed_backend_refuses():
    backend = create("ggml", accel=False)
    x = backend.upload(np.ones((2, 32), np.float32), "float32")
    backend.close()
    with pytest.raises(CMatrixError, match="closed"):
        backend.matmul(x, x, False, True)


def test_q4_0_weights_use_the_repacked_layout_and_give_the_same_products(be, monkeypatch):
    """On an AVX2 CPU q4_0 weights of whole groups of 8 rows live in ggml's repacked layout
    (llama.cpp's fast kernels); products and downloads equal the plain layout's."""
    if be._repack is None:
        pytest.skip("this CPU has no AVX2: ggml keeps q4_0 in the plain layout")
    monkeypatch.setenv("CMATRIX_GGML_REPACK", "0")
    plain = create("ggml", threads=1, accel=False)
    assert plain._repack is None
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    for rows, repacked in ((64, True), (60, False)):  # 60 rows: not whole groups of 8
        w = rng.standard_normal((rows, 96)).astype(np.float32)
        fast, slow = (b.upload(w, "float32", quant="q4_0", quant_axis=1) for b in (be, plain))
        (res,) = fast.weights.values()
        assert res.repacked is repacked
        a, a_plain = be.upload(x, "float32"), plain.upload(x, "float32")
        np.testing.assert_allclose(be.download(be.matmul(a, fast, False, True), "float32"),
                                   plain.download(plain.matmul(a_plain, slow, False, True), "float32"),
                                   rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(be.download(fast, "float32"), quant.roundtrip(w, "q4_0", 1))
    plain.close()
