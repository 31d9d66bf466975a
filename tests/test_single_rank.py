"""The native API on a one-rank cluster in this process (no mpiexec): validation
and result types. Multi-rank behaviour is in test_engine_mpi.py."""

import os

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


def test_weights_that_are_neither_shares_nor_auto_are_refused(cl):
    with pytest.raises(cm.InputError, match="'auto'"):
        cm.init(weights="fast")
    assert list(cl.weights) == [1.0]


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


def test_tensors_without_data_are_refused(cl):
    torch = pytest.importorskip("torch")
    meta = torch.empty(4, 4, device="meta")
    refused(cl, lambda: cl.shard(meta), "meta device")
    refused(cl, lambda: cl.matmul(meta, f32(4, 4)), "meta device")
    refused(cl, lambda: cl.shard(torch.eye(4).to_sparse()), "sparse")


def test_accel_must_be_a_flag(cl):
    refused(cl, lambda: cm.init(accel="false"), "accel: True or False")
    refused(cl, lambda: cm.init(accel=[0]), "accel: True or False")


def test_loads_npy_paths(cl, tmp_path):
    w = f32(4, 5)
    np.save(tmp_path / "w.npy", w)
    a = f32(2, 4)
    np.testing.assert_allclose(cl.matmul(a, cl.shard(tmp_path / "w.npy")), a @ w, rtol=1e-5, atol=1e-5)


def test_freed_handles_are_refused(cl):
    W = cl.shard(f32(3, 3))
    W.free()
    refused(cl, lambda: cl.matmul(f32(2, 3), W), "was freed")


def test_sharded_a_with_wrong_inner_size_is_refused_before_gathering(cl):
    A = cl.shard(f32(4, 6), axis=0)
    B = cl.shard(f32(5, 7))
    refused(cl, lambda: cl.matmul(A, B), "inner dimensions")
    refused(cl, lambda: cl.matmul(f32(3), B, transpose_a=True), "transpose_a needs a 2-D a")


def test_wrong_argument_types_raise_cmatrix_errors(cl, tmp_path):
    refused(cl, lambda: cl.gather(f32(2, 2)), "expected a matrix handle")
    refused(cl, lambda: cl.free(3), "expected a matrix handle")
    refused(cl, lambda: cl.free("l0.up"), "no cached matrix named 'l0.up'")
    refused(cl, lambda: cl.shard(f32(2, 2), axis=1.0), "axis")
    refused(cl, lambda: cl.shard(f32(2, 2), axis=True), "axis")
    (tmp_path / "empty.npy").write_bytes(b"")
    refused(cl, lambda: cl.shard(tmp_path / "empty.npy"), "cannot read")
    assert cm.init(accel=np.array([True])) is cl


def test_gathered_replicated_matrix_is_a_copy(cl):
    x = np.ones((2, 3), np.float32)
    R = cl.replicate(x)
    x[:] = 5  # the caller's array is not the resident one either
    g = R.gather()
    g *= 0
    W = cl.shard(np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(cl.matmul(R, W), np.full((2, 4), 3, np.float32))


def test_kept_half_results_are_rounded_like_gathered_ones(cl):
    p = np.full((2, 2), 40000, np.float16)
    P = cl.shard(p)
    K = cl.add(P, P, out="keep")  # 80000 overflows float16
    assert np.isinf(K.gather()).all()
    assert np.isinf(cl.sub(K, P)).all(), "the resident block was not rounded to float16"


def test_nested_operations_are_refused_and_frees_deferred(cl, monkeypatch):
    W, V = cl.shard(f32(3, 3)), cl.shard(f32(3, 3))
    original = cl.driver.runtime.backend.matmul

    def finalizer_like(*args, **kwargs):  # what a __del__ running mid-command could do
        V.free()
        W.gather()
        return original(*args, **kwargs)

    monkeypatch.setattr(cl.driver.runtime.backend, "matmul", finalizer_like)
    with pytest.raises(cm.RankError, match="another cluster operation is running"):
        cl.matmul(f32(2, 3), W)

    monkeypatch.undo()
    assert V.freed and V.id in cl.driver.runtime.blocks  # deferred, not run inside the command
    cl.matmul(f32(2, 3), W)
    assert V.id not in cl.driver.runtime.blocks

    def shutdown_inside(*args, **kwargs):
        cl.shutdown()
        return original(*args, **kwargs)

    monkeypatch.setattr(cl.driver.runtime.backend, "matmul", shutdown_inside)
    with pytest.raises(cm.RankError, match="cannot shut down while a cluster operation is running"):
        cl.matmul(f32(2, 3), W)
    assert not cl.closed


def test_blocks_of_a_failed_command_are_freed(cl, monkeypatch):
    from cmatrix.engine import faults

    monkeypatch.setitem(faults._FAULTS, ("shard", "upload", 0), "raise")
    before = set(cl.driver.runtime.blocks)
    with pytest.raises(cm.RankError, match="injected fault in shard/upload on rank 0"):
        cl.shard(f32(3, 3))
    orphan = set(cl.driver.runtime.blocks) - before
    assert len(orphan) == 1
    cl.matmul(f32(1, 3), cl.shard(f32(3, 3)))
    assert not orphan & set(cl.driver.runtime.blocks)


def test_handles_cannot_be_copied(cl):
    import copy

    with pytest.raises(TypeError, match="cannot be copied"):
        copy.copy(cl.shard(f32(2, 2)))


@pytest.mark.skipif(not has_torch(), reason="torch not installed")
def test_sparse_tensors_are_refused(cl):
    import torch

    refused(cl, lambda: cl.shard(torch.eye(3).to_sparse()), "sparse tensors are not supported")


def test_unwritable_destinations_are_refused_before_the_product(cl, tmp_path):
    a, w = f32(3, 4), f32(4, 5)
    W = cl.shard(w)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(cl, lambda: cl.matmul(a, W, out=f"h5:{blocker}/r.h5#/y"), "is a file, not a folder")
    refused(cl, lambda: cl.matmul(a, W, out=f"h5:{tmp_path}/r.h5#/y\0z"), "NUL")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root may write anywhere: the check cannot fail then
        refused(cl, lambda: cl.matmul(a, W, out=f"h5:{locked}/r.h5#/y"), "no permission")


def test_a_write_that_fails_keeps_the_result(cl, tmp_path, monkeypatch):
    from cmatrix.io import sinks

    a, w = f32(3, 4), f32(4, 5)
    W = cl.shard(w)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks, "write_bin", full_disk)
    monkeypatch.setenv("CMATRIX_SHM_DIR", str(tmp_path))
    with pytest.raises(cm.SinkError, match="No space left") as info:
        cl.matmul(a, W, out="shm:y")
    np.testing.assert_allclose(info.value.result, a @ w, rtol=1e-6)


def test_a_destination_without_room_is_refused_before_the_product(cl, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 4096))
    a, w = f32(300, 40), f32(40, 500)
    refused(cl, lambda: cl.matmul(a, w, out=f"h5:{tmp_path}/r.h5#/y"), "MiB free")
    refused(cl, lambda: cl.silu(a, out=f"h5:{tmp_path}/r.h5#/y"), "MiB free")
    refused(cl, lambda: cl.add(a, a, out=f"h5:{tmp_path}/r.h5#/y"), "MiB free")
