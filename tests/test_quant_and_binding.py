"""Quantised shards through the API, device binding and dtype refusals, and
``cmatrix doctor`` with and without mpirun."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from backend_cases import need
from conftest import job_env, run_cmd
from test_single_rank import refused

import cmatrix as cm
from cmatrix.core import quant
from cmatrix.engine import launch
from cmatrix.engine.ranks import RankTable
from cmatrix.ops.setup import _device_index

rng = np.random.default_rng(5)


@pytest.fixture(scope="module")
def cl():
    return cm.init()


def test_quantised_weight_computes_with_its_block_values(cl):
    w = rng.standard_normal((64, 10)).astype(np.float32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    W = cl.shard(w, quant="q4_0")
    assert W.quant == "q4_0" and W.dtype == "float32" and "q4_0" in repr(W)
    values = quant.roundtrip(w, "q4_0", 0)
    np.testing.assert_array_equal(W.gather(), values)
    np.testing.assert_allclose(cl.matmul(x, W), x @ values, rtol=1e-5, atol=1e-5)
    assert not np.allclose(values, w, atol=1e-3)  # 4-bit rounding really happened


def test_quantised_input_is_checked_before_data_moves(cl):
    w = rng.standard_normal((40, 64)).astype(np.float32)
    refused(cl, lambda: cl.shard(w, quant="q5_k"), "unknown quantisation")
    refused(cl, lambda: cl.shard(w, quant="q8_0"), "multiple of 32, got 40")
    refused(cl, lambda: cl.shard(w, quant="q8_0", quant_axis=2), "quant_axis")
    W = cl.shard(w, quant="q8_0", quant_axis=1)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    refused(cl, lambda: cl.matmul(x[:, :40], W), "pass transpose_b=True")
    other = cl.shard(w.T.copy())
    refused(cl, lambda: cl.matmul(W, other), "only be the weight b")
    refused(cl, lambda: cl.add(W, w), "quantised weights are for matmul only")
    assert cl.matmul(x, W, transpose_b=True).shape == (3, 40)


def test_a_rank_without_a_dtype_is_refused_before_data_moves(cl):
    saved = cl.ranks
    row = saved[0]
    cl.driver.ranks = RankTable([type(row)(**{**row.__dict__, "dtypes": ("float32",)})])
    try:
        W = cl.shard(np.ones((4, 4), np.float32))
        refused(cl, lambda: cl.shard(np.ones((4, 4), np.float16)), "cannot compute in float16")
        refused(cl, lambda: cl.matmul(np.ones((2, 4), np.float16), W), "cannot compute in float16")
    finally:
        cl.driver.ranks = saved


def test_devices_go_to_ranks_of_the_same_backend_in_local_order():
    names = ["torch", "numpy", "torch", "torch", "opencl"]
    accel = [True, True, False, True, True]
    # world ranks 0-3 on one host, rank 4 alone on another
    peers = {r: (0, 1, 2, 3) for r in range(4)} | {4: (4,)}
    got = [_device_index(SimpleNamespace(local_peers=peers[r], local_rank=peers[r].index(r), rank=r),
                         names, accel) for r in range(5)]
    assert got == [0, 0, 1, 1, 0]  # rank 2 has accel off, so rank 3 takes the second device


def test_doctor_without_mpirun_shows_device_memory_and_fallback():
    need("torch")
    r = run_cmd([sys.executable, "-m", "cmatrix", "doctor", "--backends", "torch"], timeout=120)
    assert r.returncode == 0, r
    assert "memory" in r.stdout and "GiB" in r.stdout, r
    assert "* rank 0 fell back to cpu" in r.stdout, r  # no GPU on this machine
    for name in ("numpy", "torch", "opencl", "ggml"):
        assert f"  {name} " in r.stdout, r


@pytest.mark.mpi
def test_doctor_under_mpirun_reports_every_rank():
    need("ggml")
    argv = [sys.executable, "-m", "cmatrix", "doctor", "--backends", "numpy,ggml", "--accel", "true,false"]
    r = run_cmd(launch.command(2, argv, None), job_env(), timeout=180)
    assert r.returncode == 0, r
    assert "2 rank(s) on 1 host(s)" in r.stdout, r
    assert "rank 0 (" in r.stdout and "rank 1 (" in r.stdout, r
    table = r.stdout.split("What each backend would give")[0]
    assert "fell back" not in table, r  # numpy, and ggml without accel, have nothing to fall back from


def test_doctor_with_an_unknown_backend_says_so():
    r = run_cmd([sys.executable, "-m", "cmatrix", "doctor", "--backends", "cuda"], timeout=120)
    assert r.returncode == 1, r
    assert "unknown backend 'cuda'" in r.stderr, r


def test_a_missing_backend_package_fails_only_when_chosen():
    script = ("import sys; sys.modules['ggml'] = None\n"  # as if ggml-python were not installed
              "from cmatrix import backends\n"
              "backends.create('numpy')\n"
              "try:\n    backends.create('llama')\n"
              "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    r = run_cmd([sys.executable, "-c", script], timeout=60)
    assert r.returncode == 0, r
    assert "CMatrixError" in r.stdout and "pip install 'cmatrix[ggml]'" in r.stdout, r


def test_a_backend_failure_names_the_operation_shapes_and_dtypes():
    from cmatrix.backends import create
    from cmatrix.backends.device import Device

    device = Device(create("numpy"))
    a = device.upload(np.ones((2, 3), np.float32), "float32")
    b = device.upload(np.ones((3, 4), np.float32), "float32")

    def broken(*args):
        raise ValueError("device lost")

    device.backend.matmul = broken
    with pytest.raises(cm.CMatrixError, match=r"failed in matmul of float32 \(2, 3\) and float32 \(3, 4\).*"
                                              "device lost"):
        device.matmul(a, b)
    with pytest.raises(cm.InputError, match="inner dimensions differ on this rank"):
        device.matmul(a, a)
    empty = device.upload(np.ones((3, 0), np.float32), "float32")
    assert empty.empty and device.download(device.matmul(a, empty), "float32").shape == (2, 0)


def test_a_rank_that_cannot_hold_a_block_fails_the_shard_cleanly(cl, monkeypatch):
    monkeypatch.setattr(cl.driver.runtime.backend.backend, "supports", lambda op, dtype, shape: False)
    with pytest.raises(cm.RankError, match="cannot hold a float32 block"):
        cl.shard(np.ones((4, 4), np.float32))
    monkeypatch.undo()
    assert cl.shard(np.ones((4, 4), np.float32)).gather().sum() == 16  # the cluster goes on


def test_a_probe_reports_a_backend_that_cannot_describe_itself(monkeypatch):
    from cmatrix import backends

    class Mute:
        def describe(self):
            raise RuntimeError("clGetDeviceInfo failed")

    monkeypatch.setattr(backends, "create", lambda *args, **kwargs: Mute())
    report = backends.probe("opencl")
    assert not report["ok"] and "clGetDeviceInfo failed" in report["error"]


def test_doctor_refuses_a_bad_accel_value():
    r = run_cmd([sys.executable, "-m", "cmatrix", "doctor", "--accel", "maybe"], timeout=120)
    assert r.returncode == 1 and "--accel: expected true/false" in r.stderr, r
