"""The backends the tests run on: one list, narrowed by ``CMATRIX_TEST_BACKENDS``.

    CMATRIX_TEST_BACKENDS=numpy,ggml make test    # only these; tests that need another skip

Unset, every backend whose package is installed here takes part. Names may be aliases
(``llama`` is ggml). ``CASES`` are the device cases of the conformance tests: numpy,
torch on the CPU, torch on CUDA/ROCm (where torch sees such a device), OpenCL and ggml.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from cmatrix import backends

#: the import each backend needs
PACKAGES = {"numpy": "numpy", "torch": "torch", "opencl": "pyopencl", "ggml": "ggml"}
#: one rank of each backend: the mixed-cluster tests
MIXED = ["numpy", "torch", "opencl", "ggml"]


def selected() -> tuple[str, ...]:
    """The backends this test run may use (``CMATRIX_TEST_BACKENDS``, else all)."""
    names = [n.strip() for n in os.environ.get("CMATRIX_TEST_BACKENDS", "").split(",") if n.strip()]
    return tuple(backends.canonical(n, "CMATRIX_TEST_BACKENDS") for n in names) or tuple(PACKAGES)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot take part in this run, or None."""
    name = backends.canonical(name)
    if name not in selected():
        return f"{name} is not in CMATRIX_TEST_BACKENDS={os.environ.get('CMATRIX_TEST_BACKENDS')}"
    if not installed(PACKAGES[name]):
        return f"{PACKAGES[name]} is not installed"
    return None


def need(*names: str) -> None:
    """Skip the calling test unless every backend named can take part (torch for a test
    that computes its reference with torch: ``need("torch")``)."""
    for name in names:
        reason = unavailable(name)
        if reason:
            pytest.skip(reason)


def cuda() -> bool:
    if unavailable("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _case(name: str, accel: bool, label: str) -> object:
    reason = unavailable(name)
    if reason is None and label == "torch-cuda" and not cuda():
        reason = "no CUDA/ROCm device here"
    skip = pytest.mark.skipif(reason is not None, reason=reason or "")
    return pytest.param((name, accel, label), id=label, marks=skip)


CASES = [_case("numpy", True, "numpy"), _case("torch", False, "torch-cpu"),
         # the GPU's quantised blocks (kept on the device, dequantised there) run on the CPU
         _case("torch", False, "torch-cpu-device-blocks"),
         _case("torch", True, "torch-cuda"), _case("opencl", True, "opencl"), _case("ggml", True, "ggml")]
#: the cases where quantised blocks do not matter (node-side operations)
DENSE_CASES = [c for c in CASES if c.id != "torch-cpu-device-blocks"]
