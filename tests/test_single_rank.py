"""The native API on a one-rank cluster in this process (no mpiexec): validation
and result types. Multi-rank behaviour is in test_engine_mpi.py."""

import numpy as np
import pytest
from conftest import has_torch

import cmatrix as cm

rng = np.random.default_rng(7)


@pytest.fixture(scope="module")
def cl():
    return cm.init()


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def refused(cl, fn, match):
    """fn() must raise InputError matching ``match`` without moving anything."""
    before = cl.stats()
    with pytest.raises(cm.InputError, match=match) as info:
        fn()
    assert cl.stats() == before, "a refused call sent a command or data"
    assert isinstance(info.value, cm.CMatrixError)
    return info.value


def test_one_rank_cluster(cl):
    assert cl.size == 1
    assert len(cl.ranks) == 1 and cl.ranks[0].backend == "numpy"
    text = str(cl.ranks)
    for column in ("rank", "host", "backend", "device", "weight"):
        assert column in text


def test_matmul_numpy_in_numpy_out(cl):
    a, w = f32(3, 5), f32(5, 4)
    y = cl.matmul(a, cl.shard(w))
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_allclose(y, a @ w, rtol=1e-5, atol=1e-5)


def test_vector_and_batched_activations(cl):
    w = f32(6, 3)
    W = cl.shard(w)
    x = f32(6)
    np.testing.assert_allclose(cl.matmul(x, W), x @ w, rtol=1e-5, atol=1e-5)
    xb = f32(2, 4, 6)
    y = cl.matmul(xb, W)
    assert y.shape == (2, 4, 3)
    np.testing.assert_allclose(y, xb @ w, rtol=1e-5, atol=1e-5)


def test_transposed_view_needs_no_copy_from_the_user(cl):
    a_t = f32(5, 3)  # a = a_t.T, an F-ordered view
    w = f32(5, 4)
    np.testing.assert_allclose(cl.matmul(a_t.T, cl.shard(w)), a_t.T @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not has_torch(), reason="torch not installed")
@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_torch_in_torch_out(cl, name):
    import torch

    dtype = getattr(torch, name)
    a = torch.randn(4, 8).to(dtype)
    w = torch.randn(8, 6).to(dtype)
    y = cl.matmul(a, cl.shard(w))
    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    ref = a.float() @ w.float()
    tol = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}[name]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * 8)


def test_shape_mismatch_is_refused(cl):
    W = cl.shard(f32(5, 4))
    err = refused(cl, lambda: cl.matmul(f32(3, 6), W), "inner dimensions")
    assert "3x6" in str(err) and "5x4" in str(err)
    refused(cl, lambda: cl.matmul(f32(3, 6), f32(5, 4)), "inner dimensions")
    refused(cl, lambda: cl.add(f32(2, 3), f32(3, 2)), "shapes differ")


def test_bad_weights_are_refused(cl):
    refused(cl, lambda: cl.shard(f32(4, 4), weights=[0.5, 0.5]), "weights: needs one share per rank")
    refused(cl, lambda: cl.shard(f32(4, 4), weights=[0.9]), "weights: shares must sum to 1")


def test_unsupported_dtype_is_refused(cl):
    refused(cl, lambda: cl.shard(np.ones((3, 3))), "w: unsupported dtype 'float64'")
    refused(cl, lambda: cl.matmul(np.ones((3, 3), dtype=np.int32), f32(3, 3)),
            "a: unsupported dtype 'int32'")


def test_missing_file_and_bad_arguments_are_refused(cl, tmp_path):
    refused(cl, lambda: cl.shard(tmp_path / "nope.npy"), "w: file not found")
    refused(cl, lambda: cl.shard(f32(3, 3), axis=2), "axis")
    refused(cl, lambda: cl.matmul(f32(3, 3), f32(3, 3), out="disk"), "out:")
    refused(cl, lambda: cl.shard(f32(3)), "2-D")
    refused(cl, lambda: cl.shard(np.zeros((0, 3), np.float32)), "empty")


def test_unknown_backend_is_refused(cl):
    refused(cl, lambda: cm.init(backends=["quantum"]), "backends: unknown backend 'quantum'")
    refused(cl, lambda: cm.init(backends=["numpy", "numpy"]), "one entry per rank")


def test_loads_npy_paths(cl, tmp_path):
    w = f32(4, 5)
    np.save(tmp_path / "w.npy", w)
    a = f32(2, 4)
    np.testing.assert_allclose(cl.matmul(a, cl.shard(tmp_path / "w.npy")), a @ w, rtol=1e-5, atol=1e-5)


def test_freed_handles_are_refused(cl):
    W = cl.shard(f32(3, 3))
    W.free()
    refused(cl, lambda: cl.matmul(f32(2, 3), W), "was freed")
