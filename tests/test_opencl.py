"""The OpenCL backend beyond the shared conformance suite: device choice, kernel
packaging, build errors, and the GEMV and GEMM paths on odd shapes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyopencl")

from cmatrix.backends import opencl as ops_opencl  # noqa: E402
from cmatrix.core.dtypes import from_float32, to_float32  # noqa: E402
from cmatrix.errors import CMatrixError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.fixture(scope="module")
def backend():
    return ops_opencl.OpenCLBackend(device_index=0, threads=1, accel=True)


@pytest.fixture
def kernels_used(backend, monkeypatch):
    """Names of the kernels each call launches."""
    used: list[str] = []
    original = backend._kernel

    def spy(name, kernel, a_dtype, b_dtype):
        used.append(kernel)
        return original(name, kernel, a_dtype, b_dtype)

    monkeypatch.setattr(backend, "_kernel", spy)
    return used


def _values(rng, shape, dtype):
    stored = from_float32(rng.standard_normal(shape).astype(np.float32), dtype)
    return stored, to_float32(stored, dtype).astype(np.float64)


def _check_matmul(backend, m, k, n, transpose_a, transpose_b, a_dtype, b_dtype):
    rng = np.random.default_rng(m + 7 * k + 13 * n)
    a, a64 = _values(rng, (k, m) if transpose_a else (m, k), a_dtype)
    b, b64 = _values(rng, (n, k) if transpose_b else (k, n), b_dtype)
    y = backend.matmul(backend.upload(a, a_dtype), backend.upload(b, b_dtype), transpose_a, transpose_b)
    got = backend.download(y, "float32")
    opa, opb = (a64.T if transpose_a else a64), (b64.T if transpose_b else b64)
    assert got.shape == (m, n) and got.flags.c_contiguous
    bound = max(TOL[a_dtype], TOL[b_dtype]) * (np.abs(opa) @ np.abs(opb)) + 1e-30
    assert float(np.max(np.abs(got - opa @ opb) / bound)) <= 1.0


def _has_gpu() -> bool:
    return bool(ops_opencl._devices()[0])


def test_fallback_reason_without_gpu(backend):
    assert backend.device.startswith("opencl:")
    if _has_gpu():
        assert backend.fallback is None
    else:
        assert backend.fallback and backend.fallback.startswith("no OpenCL GPU")
    assert backend.describe()["fallback"] == backend.fallback
    assert backend.memory() and backend.memory() > 0


def test_accel_off_gives_cpu_without_fallback():
    be = ops_opencl.OpenCLBackend(accel=False)
    assert be.fallback is None and be.is_cpu


def test_device_index_past_the_gpus_falls_back():
    be = ops_opencl.OpenCLBackend(device_index=99)
    assert be.is_cpu and "GPU" in be.fallback


def test_cpu_threads_limited():
    # PoCL reads its thread count once per process: check in a fresh one.
    code = ("from cmatrix.backends.opencl import OpenCLBackend as B; "
            "b = B(threads=1, accel=False); print(b.device, b._device.max_compute_units)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT).stdout
    if "PoCL" not in out:
        pytest.skip(f"CPU device is not PoCL: {out}")
    assert out.split()[-1] == "1" and "1 thread" in out


def test_kernels_found_in_the_package():
    folder = ops_opencl.kernel_dir()
    assert {"common.cl", "gemm.cl", "elementwise.cl"} <= {p.name for p in folder.glob("*.cl")}
    text = ops_opencl.kernel_source("gemm.cl")
    assert '#line 1 "gemm.cl"' in text and "gemm_nn" in text and "gemv_t" in text


def test_pyproject_lists_every_subpackage():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cmatrix").rglob("__init__.py")}
    assert found <= set(config["packages"]), "add the new subpackage to [tool.setuptools] packages"
    assert config["package-dir"]["cmatrix.kernels"] == "kernels"


def test_build_error_names_file_options_and_log(backend):
    broken = "__kernel void broken(__global float *x) { x[0] = no_such_symbol_here; }"
    with pytest.raises(CMatrixError) as info:
        backend.build("broken.cl", "-DFLAG_FOR_TEST=1", source=broken)
    message = str(info.value)
    assert "broken.cl" in message and "-DFLAG_FOR_TEST=1" in message
    assert "no_such_symbol_here" in message  # the compiler's log


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gemv_path(backend, kernels_used, dtype, transpose_b):
    _check_matmul(backend, 1, 1031, 517, False, transpose_b, dtype, dtype)
    assert kernels_used == ["gemv_t" if transpose_b else "gemv_n"]


@pytest.mark.parametrize("transpose_a", [False, True])
def test_column_result_uses_gemv(backend, kernels_used, transpose_a):
    _check_matmul(backend, 515, 1029, 1, transpose_a, False, "float32", "float16")
    assert kernels_used == ["gemv_n" if transpose_a else "gemv_t"]


def test_gemv_mixed_dtypes(backend):
    _check_matmul(backend, 1, 300, 77, True, True, "float16", "bfloat16")


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, True), (False, True)])
def test_gemm_path_odd_shapes(backend, kernels_used, transpose_a, transpose_b):
    _check_matmul(backend, 197, 131, 263, transpose_a, transpose_b, "float32", "float32")
    _check_matmul(backend, 2, 3, 2, transpose_a, transpose_b, "float32", "float32")
    flags = ("t" if transpose_a else "n") + ("t" if transpose_b else "n")
    assert set(kernels_used) == {f"gemm_{flags}"}


def test_empty_and_zero_depth(backend):
    z = backend.matmul(backend.upload(np.zeros((3, 0), np.float32), "float32"),
                       backend.upload(np.zeros((0, 4), np.float32), "float32"))
    np.testing.assert_array_equal(backend.download(z, "float32"), np.zeros((3, 4), np.float32))
    e = backend.upload(np.zeros((0, 5), np.float16), "float16")
    assert backend.download(backend.add(e, e), "bfloat16").shape == (0, 5)


def test_download_narrows_like_numpy(backend):
    x = (np.random.default_rng(5).standard_normal((9, 31)) * 1e3).astype(np.float32)
    handle = backend.upload(x, "float32")
    np.testing.assert_array_equal(backend.download(handle, "float16"), x.astype(np.float16))
    np.testing.assert_array_equal(backend.download(handle, "bfloat16"), from_float32(x, "bfloat16"))


def test_float16_specials_survive(backend):
    special = np.array([0.0, 6e-8, -6e-8, 3e-5, 65504, -65504, np.inf, -np.inf, np.nan, 0.1],
                       dtype=np.float16)
    one = backend.upload(np.ones((1, 1), np.float16), "float16")
    row = backend.download(backend.matmul(one, backend.upload(special[None, :], "float16")), "float16")
    np.testing.assert_array_equal(row[0], special)
    total = backend.download(backend.add(backend.upload(special, "float16"),
                                         backend.upload(np.zeros_like(special), "float16")), "float16")
    np.testing.assert_array_equal(total, special)


def test_gpu_blocking_on_this_device():
    """The GPU blocking (many work-items, vloadN, vload_half) computed on whatever device
    is here, so its code paths are checked even without a GPU."""
    be = ops_opencl.OpenCLBackend(accel=False)
    be.tiles, be.flags, be.is_cpu = dict(ops_opencl.GPU_TILES), (), False
    for m, k, n, ta, tb in [(1, 1031, 517, False, False), (1, 1031, 517, False, True),
                            (70, 200, 90, True, False), (33, 64, 17, False, True)]:
        _check_matmul(be, m, k, n, ta, tb, "float16", "bfloat16")
    x = from_float32(np.linspace(-3, 3, 77 * 31, dtype=np.float32).reshape(77, 31), "float16")
    got = be.download(be.sub(be.upload(x, "float16"), be.upload(x, "float16")), "float32")
    np.testing.assert_array_equal(got, np.zeros((77, 31), np.float32))
