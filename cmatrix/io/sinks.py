"""Where results go: ``out=`` on operations.

* ``None``: returned to the driver (numpy or torch, like the inputs);
* ``"keep"``: left distributed on the ranks (a handle is returned);
* ``"h5:PATH#/dataset"``: an HDF5 dataset, with attributes describing the
  operation; the file is rewritten atomically (other datasets are kept);
* ``"shm:NAME"``: ``/dev/shm/cmatrix/NAME.bin`` (``$CMATRIX_SHM_DIR`` overrides
  the folder) in the ``.bin`` format, for other processes on the driver's host.

File sinks return the location written, e.g. ``"/dev/shm/cmatrix/y.bin"``.
The h5py on the package registry is serial, so results are gathered to the
driver and written there; see README for why no parallel HDF5 path exists.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._version import __version__
from ..core.arrays import HostArray
from ..errors import InputError
from . import h5
from .binfmt import write_bin

_SHM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


@dataclass(frozen=True)
class Sink:
    kind: str  # "driver", "keep", "h5" or "shm"
    path: Path | None = None
    dataset: str | None = None

    @property
    def keep(self) -> bool:
        return self.kind == "keep"

    @property
    def is_file(self) -> bool:
        return self.kind in ("h5", "shm")


def shm_dir() -> Path:
    return Path(os.environ.get("CMATRIX_SHM_DIR", "/dev/shm/cmatrix"))


def parse(out: str | None) -> Sink:
    """Check ``out`` before any data moves."""
    if out is None:
        return Sink("driver")
    if out == "keep":
        return Sink("keep")
    if isinstance(out, str) and out.startswith("h5:"):
        path, sep, dataset = out[3:].rpartition("#")
        if not sep or not path or not dataset.strip("/"):
            raise InputError(f"out: expected 'h5:PATH#/dataset', e.g. 'h5:results.h5#/y', got {out!r}")
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise InputError("out='h5:...' needs h5py: pip install 'cmatrix[io]'") from None
        if Path(path).is_dir():
            raise InputError(f"out: {path} is a directory, not an HDF5 file")
        if "\0" in dataset or "\0" in path:
            raise InputError(f"out: a NUL character in {out!r}; HDF5 names and paths cannot hold one")
        _check_writable(Path(path).parent, out)
        return Sink("h5", Path(path), "/" + dataset.strip("/"))
    if isinstance(out, str) and out.startswith("shm:"):
        name = out[4:]
        if not _SHM_NAME.fullmatch(name) or ".." in name:
            raise InputError(f"out: 'shm:NAME' takes a plain file name (letters, digits, '_', '.', '-'), "
                             f"got {out!r}")
        _check_writable(shm_dir(), out)
        return Sink("shm", shm_dir() / f"{name}.bin")
    raise InputError(f"out: expected None (result to the driver), 'keep' (stay distributed), "
                     f"'h5:PATH#/dataset' or 'shm:NAME', got {out!r}")


def _check_writable(folder: Path, out: str) -> None:
    """The file of ``out`` can be made: its folder, or the nearest folder above it that
    exists (the write creates the rest), is a folder this process may write in."""
    place = Path(os.path.abspath(folder))
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise InputError(f"out: cannot write {out!r}: {place} is a file, not a folder")
    if not os.access(place, os.W_OK | os.X_OK):
        raise InputError(f"out: cannot write {out!r}: no permission to write in {place}")


def deliver(sink: Sink, data: np.ndarray, dtype: str, attrs: dict,
            written: Callable[[int], None] | None = None) -> str:
    """Write a gathered result (host storage of logical ``dtype``) to a file sink;
    ``written(nbytes)`` runs as the data is written (before the file takes its name)."""
    if sink.kind == "shm":
        sink.path.parent.mkdir(parents=True, exist_ok=True)
        write_bin(sink.path, data, dtype, on_chunk=written)
        return str(sink.path)
    attrs = {**attrs, "cmatrix_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    h5.write(sink.path, HostArray(data, dtype, "numpy"), sink.dataset, attrs, written)
    return f"{sink.path}#{sink.dataset}"


def describe(op: str, operands: dict, out_dtype: str, plan_axis: int, counts: tuple[int, ...]) -> dict:
    """HDF5 attributes of a result: the operation, its operands and how it was split."""
    attrs: dict = {"operation": op, "dtype": out_dtype, "plan_axis": plan_axis, "plan_counts": list(counts)}
    for arg, (name, shape) in operands.items():
        attrs[f"{arg}_name"] = name or ""
        attrs[f"{arg}_shape"] = list(shape)
    return attrs
