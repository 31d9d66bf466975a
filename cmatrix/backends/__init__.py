"""Backends by name, each in its own module, imported only when chosen."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Any

from ..errors import CMatrixError, InputError
from .base import Backend

# name -> (module, class); modules are imported lazily so a missing optional
# dependency only matters to the ranks that choose that backend.
_MODULES = {
    "numpy": ("numpy", "NumpyBackend"),
    "torch": ("torch", "TorchBackend"),
    "opencl": ("opencl", "OpenCLBackend"),
    "ggml": ("ggml", "GGMLBackend"),
}
# "llama" is the seed's name for its GGML (llama.cpp) backend.
ALIASES = {"cpu": "numpy", "blas": "numpy", "llama": "ggml", "pytorch": "torch", "cl": "opencl"}


def available() -> list[str]:
    return sorted(_MODULES)


def canonical(name: str, arg: str = "backends") -> str:
    """The registered name for ``name`` (aliases resolved) or a clear InputError."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in _MODULES:
        raise InputError(f"{arg}: unknown backend {name!r}; available: {', '.join(available())}")
    return key


def create(name: str, device_index: int = 0, threads: int = 1, accel: bool = True) -> Backend:
    module_name, class_name = _MODULES[canonical(name)]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        raise CMatrixError(
            f"backend {name!r} needs a package that is not installed here ({exc.name}); "
            f"install it with: pip install 'cmatrix[{canonical(name)}]'"
        ) from exc
    return getattr(module, class_name)(device_index=device_index, threads=threads, accel=accel)


def probe(name: str, device_index: int = 0, threads: int = 1) -> dict[str, Any]:
    """What ``name`` would give this rank: device, memory and fallback, or why it cannot load."""
    try:
        backend = create(name, device_index=device_index, threads=threads, accel=True)
    except Exception as exc:  # a probe reports, it never fails
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        return {"ok": True, **backend.describe()}
    except Exception as exc:
        return {"ok": False, "error": f"started, but describing the device failed: "
                                      f"{type(exc).__name__}: {exc}"}
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


def probe_all(device_index: dict[str, int], threads: int = 1) -> dict[str, dict[str, Any]]:
    """:func:`probe` for every backend; ``device_index[name]`` is the index this rank would take."""
    return {name: probe(name, device_index[name], threads) for name in available()}


def llm_path(device: Any) -> str:
    """How an LLM decoder runs its blocks on ``device`` (a rank's
    :class:`~cmatrix.backends.device.Device`): "ggml" (whole-block ggml graphs: ggml ranks and,
    where ggml is installed, numpy and CPU torch ranks over their own arrays), "torch" (torch
    operations on the accelerator of torch GPU ranks) or "numpy" (numpy activations around
    the backend's matmuls: OpenCL, or no ggml).

    ``CMATRIX_DECODER=numpy`` takes the numpy path on every rank (the reference, for
    debugging); ``CMATRIX_DECODER=torch`` the torch path on CPU torch ranks too (slower there:
    torch's per-operation cost).
    """
    choice = os.environ.get("CMATRIX_DECODER", "auto")
    if choice not in ("auto", "numpy", "torch"):
        raise CMatrixError(f"CMATRIX_DECODER: auto, numpy or torch, got {choice!r}")
    if choice == "numpy":
        return "numpy"
    cpu = device.name == "numpy" or (device.name == "torch" and device.backend.torch_device.type == "cpu")
    if device.name == "torch" and (choice == "torch" or not cpu):
        return "torch"
    if device.name == "ggml" or (cpu and importlib.util.find_spec("ggml") is not None):
        return "ggml"
    return "numpy"


__all__ = ["Backend", "ALIASES", "available", "canonical", "create", "llm_path", "probe", "probe_all"]


def decode_device(dev: Any) -> tuple[Any, bool]:
    """Where this rank's LLM decoder multiplies: the ggml graphs of numpy and CPU torch ranks
    (where ggml is installed) run on a ggml backend over the same cores; (device, whether it
    was started here and must be closed)."""
    from .device import Device

    if dev.name == "ggml" or llm_path(dev) != "ggml":
        return dev, False
    return Device(create("ggml", threads=getattr(dev.backend, "threads", 1), accel=False)), True
