"""Loading matrices from files (more formats and the .bin layout come with the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError

LOADABLE = (".npy",)


def load_array(path: str | os.PathLike, arg: str = "path") -> np.ndarray:
    """Read a matrix from ``path``; never unpickles anything."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{arg}: file not found: {p}")
    if p.suffix not in LOADABLE:
        raise InputError(f"{arg}: cannot load {p.suffix!r} files; supported: {', '.join(LOADABLE)}")
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(f"{arg}: cannot read {p} as a plain .npy array: {exc}") from exc
