"""Helpers every file reader shares: which array a path names, its logical dtype, byte order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core import dtypes
from ..errors import InputError

_MAX_LISTED = 10


def native(a: np.ndarray) -> np.ndarray:
    """``a`` in native byte order (a copy only when it was not)."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def dtype_label(a: np.ndarray, bfloat16: bool = False) -> str:
    """Logical dtype of stored ``a``: float32/float16, bfloat16 bits if flagged, else numpy's name."""
    if bfloat16 and a.dtype == np.uint16:
        return "bfloat16"
    for name in ("float32", "float16"):
        if a.dtype == dtypes.STORAGE[name]:
            return name
    return str(a.dtype)


def choose_key(path: Path, names: list[str], key: str | None) -> str:
    """The array a spec names: ``key`` if present, else the file's only array."""
    if key is not None:
        if key in names:
            return key
        raise InputError(f"{path} has no array named {key!r}; available: {_listing(names)}")
    if len(names) == 1:
        return names[0]
    if not names:
        raise InputError(f"{path} holds no arrays")
    raise InputError(f"{path} holds {len(names)} arrays; name one as {path}#KEY. "
                     f"Available: {_listing(names)}")


def _listing(names: list[str]) -> str:
    if not names:
        return "(none)"
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" (and {more} more)" if more > 0 else "")
