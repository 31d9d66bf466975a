"""How the seed's API takes and gives data: 2-D matrices in, torch tensors out."""

from __future__ import annotations

from typing import Any

from ..core.arrays import HostArray, is_torch
from ..errors import InputError
from ..io.store import from_user


def as_matrix(data: Any) -> HostArray:
    """The user's data as a 2-D host matrix (leading axes of length 1 dropped)."""
    host = from_user(data, "matrix_file_path")
    shape = host.shape
    while host.data.ndim > 2 and host.data.shape[0] == 1:
        host = HostArray(host.data.reshape(host.data.shape[1:]), host.dtype, host.kind)
    if host.data.ndim != 2 or 0 in host.data.shape:
        raise InputError(f"matrix_file_path: expected a non-empty 2-D matrix, got shape {shape}; as the "
                         "seed README says, reshape in torch first (e.g. x.unsqueeze(1) for a column)")
    return host


def as_tensor(x: Any) -> Any:
    """A result as the seed returned it: a torch tensor when torch is installed."""
    if is_torch(x):
        return x
    try:
        import torch
    except ImportError:
        return x
    return torch.from_numpy(x)
