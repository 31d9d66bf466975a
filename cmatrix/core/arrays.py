"""Host storage of user arrays (numpy, torch) and the way back; files are :mod:`cmatrix.io`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from . import dtypes

_NUMPY_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


@dataclass
class HostArray:
    """Host storage of a user array: ``data`` is numpy storage of logical ``dtype``.

    ``kind`` ("numpy" or "torch") is what results computed from it come back as.
    """

    data: np.ndarray
    dtype: str
    kind: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def from_array(x: Any, arg: str) -> HostArray:
    """Accept a numpy array or a torch tensor (paths: :func:`cmatrix.io.store.from_user`)."""
    if isinstance(x, HostArray):  # already host storage (e.g. reshaped by the seed layer)
        return x
    if is_torch(x):
        return _from_torch(x, arg)
    if isinstance(x, np.ndarray):
        name = _NUMPY_NAMES.get(x.dtype)
        if name is None:
            raise InputError(f"{arg}: unsupported dtype {str(x.dtype)!r}; numpy arrays must be "
                             "float32 or float16 (bfloat16 comes as a torch tensor); convert "
                             "first, e.g. x.astype(np.float32)")
        return HostArray(x, name, "numpy")
    raise InputError(f"{arg}: expected a numpy array, torch tensor or file path, got {type(x).__name__}")


def _from_torch(t: Any, arg: str) -> HostArray:
    import torch

    t = t.detach()
    if t.layout != torch.strided:
        raise InputError(f"{arg}: sparse tensors are not supported; pass t.to_dense()")
    if t.is_meta:
        raise InputError(f"{arg}: a tensor on the meta device has no data (a model built without "
                         "loading its weights); load the weights first")
    if t.device.type != "cpu":
        t = t.cpu()
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    name = names.get(t.dtype)
    if name is None:
        dtypes.check(str(t.dtype).replace("torch.", ""), arg)
    data = t.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else t.numpy()
    return HostArray(data, name, "torch")


def to_user(data: np.ndarray, dtype: str, kind: str) -> Any:
    """Host storage -> the kind of array the caller passed in."""
    if kind == "torch":
        import torch

        if dtype == "bfloat16":
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(data)
    if dtype == "bfloat16":  # numpy has no bfloat16: float32 values rather than raw bits
        return dtypes.bf16_to_float32(data)
    return data


def check_matrix(h: HostArray, arg: str) -> None:
    if h.data.ndim != 2:
        raise InputError(f"{arg}: expected a 2-D matrix, got shape {h.shape}")
    if 0 in h.shape:
        raise InputError(f"{arg}: matrix is empty (shape {h.shape})")


#: bytes a resident block's data starts on: a cache line, and what ggml needs to borrow it
BLOCK_ALIGNMENT = 64


def aligned(array: np.ndarray, alignment: int = BLOCK_ALIGNMENT) -> np.ndarray:
    """``array`` as C-contiguous data starting on ``alignment`` bytes: itself when it already
    is, else one copy (numpy's large allocations start 16 bytes past a page boundary)."""
    array = np.ascontiguousarray(array)
    if array.ctypes.data % alignment == 0:
        return array
    spare = np.empty(array.nbytes + alignment, dtype=np.uint8)
    skip = -spare.ctypes.data % alignment
    out = spare[skip:skip + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out
