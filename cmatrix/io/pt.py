"""``.pt`` / ``.pth`` files: torch tensors and (nested) dicts of tensors.

Files are read with ``torch.load(..., weights_only=True)``: a file holding any
other pickled object is refused, and no code from it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..core.arrays import HostArray
from ..errors import InputError
from .atomic import atomic_path
from .reading import choose_key


def need_torch() -> Any:
    """The torch module, or an InputError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise InputError("reading and writing .pt files needs torch: pip install 'cmatrix[torch]'") from exc
    return torch


def read(path: Path, key: str | None) -> HostArray:
    """The tensor in ``path`` (or the one named ``key`` in its state dict)."""
    torch = need_torch()
    obj = _load(path)
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise InputError(f"{path} holds a single tensor, not a dict; remove '#{key}' from the path")
        tensor = obj
    elif isinstance(obj, dict):
        tensors = dict(_flatten(obj, "", torch))
        tensor = tensors[choose_key(path, list(tensors), key)]
    else:
        raise InputError(f"{path} holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    data, dtype = from_tensor(tensor)
    return HostArray(data, dtype, "torch")


def _load(path: Path) -> Any:
    torch = need_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"refusing to load {path}: it is not a plain tensor file ({_reason(exc)}). cmatrix loads .pt "
            "files with torch.load(weights_only=True) and never runs pickled code; save only "
            "tensors, e.g. torch.save(model.state_dict(), path)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails deep in torch, in any way
        raise InputError(f"cannot read {path} as a torch file: {type(exc).__name__}: {exc}") from exc


def _reason(exc: Exception) -> str:
    """The useful sentence of torch's weights-only error (the rest is boilerplate)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__


def _flatten(obj: dict, prefix: str, torch: Any):
    """``(dotted name, tensor)`` for every tensor in nested dicts; other values skipped."""
    for name, value in obj.items():
        full = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            yield full, value
        elif isinstance(value, dict):
            yield from _flatten(value, f"{full}.", torch)


def from_tensor(t: Any) -> tuple[np.ndarray, str]:
    """A CPU copy-free view of tensor ``t``: ``(storage, logical dtype or torch's name)``."""
    torch = need_torch()
    t = t.detach().cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), "bfloat16"
    name = str(t.dtype).replace("torch.", "")
    try:
        data = t.resolve_conj().resolve_neg().numpy()
    except TypeError:  # float8 and friends: numpy has no such type
        return t.float().numpy(), name
    return data, name


def to_tensor(data: np.ndarray, dtype: str) -> Any:
    """Storage of logical ``dtype`` -> a CPU tensor sharing its memory (bf16 as torch.bfloat16)."""
    torch = need_torch()
    data = np.ascontiguousarray(data)
    if dtype == "bfloat16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def save_tensor(path: Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path``, atomically."""
    torch = need_torch()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return path


def write(path: Path, host: HostArray, key: str | None) -> Path:
    """Save ``host`` as a bare tensor, or under ``key`` in the file's dict of tensors.

    With a key, an existing file holding a dict keeps its other entries; any
    other existing file is replaced.
    """
    tensor = to_tensor(host.data, host.dtype)
    if key is None:
        return save_tensor(path, tensor)
    entries: dict = {}
    if path.is_file():
        existing = _load(path)
        if isinstance(existing, dict):
            entries = dict(existing)
    entries[key] = tensor
    return save_tensor(path, entries)
