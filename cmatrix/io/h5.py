"""``.h5`` / ``.hdf5`` files: one array per dataset, named by its HDF5 path.

HDF5 has no bfloat16 type: cmatrix stores its bits as ``uint16`` with the
attribute ``cmatrix_dtype = "bfloat16"``, and reads such datasets back as bfloat16.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.arrays import HostArray
from ..errors import InputError
from .atomic import atomic_path
from .reading import choose_key, dtype_label, native

DTYPE_ATTR = "cmatrix_dtype"


def need_h5py() -> Any:
    """The h5py module, or an InputError saying how to install it."""
    try:
        import h5py
    except ImportError as exc:
        raise InputError("reading and writing .h5 files needs h5py: pip install 'cmatrix[io]'") from exc
    return h5py


def _open(path: Path, mode: str) -> Any:
    h5py = need_h5py()
    try:
        return h5py.File(path, mode)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot open {path} as an HDF5 file: {exc}") from exc


def dataset_names(f: Any) -> list[str]:
    """Every dataset in open file ``f``, as absolute HDF5 paths (``/group/name``)."""
    h5py = need_h5py()
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(f"/{name}") if isinstance(obj, h5py.Dataset) else None)
    return names


def read(path: Path, key: str | None) -> HostArray:
    """The dataset named ``key`` (with or without a leading ``/``), or the file's only one."""
    if key is not None and not key.startswith("/"):
        key = f"/{key}"
    with _open(path, "r") as f:
        try:
            name = choose_key(path, dataset_names(f), key)
            ds = f[name]
            bf16 = _attr_text(ds.attrs.get(DTYPE_ATTR)) == "bfloat16"
            data = native(np.asarray(ds[()]))
        except InputError:
            raise
        except (OSError, TypeError, ValueError, RuntimeError, KeyError) as exc:  # a damaged file
            raise InputError(f"cannot read {key or 'the dataset'} of {path}: {type(exc).__name__}: {exc}") \
                from exc
    return HostArray(data, dtype_label(data, bfloat16=bf16), "numpy")


def _attr_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def write(path: Path, host: HostArray, key: str, attrs: dict | None = None,
          on_written: Callable[[int], None] | None = None) -> Path:
    """Store ``host`` as dataset ``key``, replacing one of that name; other datasets are kept.

    ``attrs`` become the dataset's attributes; ``on_written(nbytes)`` runs after
    the data is written, before the file takes its final name.
    """
    need_h5py()
    with atomic_path(path) as tmp:
        existing = path.is_file()
        if existing:
            shutil.copyfile(path, tmp)
        with _open(tmp, "a" if existing else "w") as f:
            if key in f:
                if not _is_dataset(f[key]):
                    raise InputError(f"{path}: {key} is a group, not a dataset; pick another name")
                del f[key]
            ds = f.create_dataset(key, data=host.data)
            if host.dtype == "bfloat16":
                ds.attrs[DTYPE_ATTR] = "bfloat16"
            for name, value in (attrs or {}).items():
                ds.attrs[name] = value
        if on_written is not None:
            on_written(host.data.nbytes)
    return path


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, need_h5py().Dataset)
