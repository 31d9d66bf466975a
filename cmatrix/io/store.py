"""Matrices in files: load, save and convert between formats.

Supported formats, by suffix:

* ``.npy``: one array (never unpickled; bfloat16 cannot be stored)
* ``.bin``: one array in cmatrix's own layout (:mod:`cmatrix.io.binfmt`)
* ``.pt`` / ``.pth``: a torch tensor or a (nested) dict of tensors (needs torch;
  loaded with ``weights_only=True``, so no pickled code ever runs)
* ``.h5`` / ``.hdf5``: datasets in an HDF5 file (needs h5py)
* ``.safetensors``: parsed here, no extra package needed

A path may name one array of a file that holds several after ``#``:
``weights.h5#/layer0/w``, ``model.safetensors#model.embed.weight``,
``state.pt#layer.weight``. Without a key, a file holding exactly one array
gives that array. Every write is atomic (:mod:`cmatrix.io.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.arrays import HostArray, from_array
from ..errors import InputError
from . import binfmt, h5, pt, safetensors
from .atomic import atomic_path, write_array
from .reading import dtype_label, native

FORMATS = (".npy", ".bin", ".pt", ".pth", ".h5", ".hdf5", ".safetensors")
#: numpy kinds that ``convert --dtype`` can turn into floats
_CONVERTIBLE_KINDS = "biuf"


def split_spec(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """``"w.h5#/layer0/w"`` -> ``(Path("w.h5"), "/layer0/w")``; no key gives ``None``.

    A string that is itself an existing file has no key. Otherwise it splits at
    the last ``#`` whose left part is an existing file or has a known suffix
    (so a key may itself contain ``#``); with no such ``#`` it is a plain path.
    """
    text = os.fspath(spec)
    if "#" not in text or os.path.isfile(text):
        return Path(text), None
    cut = len(text)
    while (cut := text.rfind("#", 0, cut)) >= 0:
        head, key = text[:cut], text[cut + 1:]
        if os.path.isfile(head) or Path(head).suffix.lower() in FORMATS:
            return Path(head), (key or None)
    return Path(text), None


def from_user(x: Any, arg: str) -> HostArray:
    """What users pass as a matrix: a numpy array, a torch tensor or a file path (read here)."""
    if isinstance(x, (str, os.PathLike)):
        return load(x, arg)
    return from_array(x, arg)


def load(spec: str | os.PathLike, arg: str = "path") -> HostArray:
    """Read one float32/float16/bfloat16 array from a file; see the module docstring.

    bfloat16 data comes back as ``uint16`` bits. ``kind`` is ``"torch"`` for
    ``.pt``/``.pth`` files and ``"numpy"`` otherwise. Raises :class:`InputError`
    for a missing or malformed file, and for other element types (with the
    ``cmatrix convert`` command that fixes it).
    """
    host = _read(spec, arg)
    if host.dtype not in dtypes.STORAGE:
        raise InputError(
            f"{arg}: {os.fspath(spec)} holds {host.dtype} data; cmatrix computes in "
            f"{', '.join(dtypes.SUPPORTED)}. Convert it first: "
            f"cmatrix convert {os.fspath(spec)} DST --dtype float32"
        )
    return host


def load_as(spec: str | os.PathLike, dtype: str | None = None, arg: str = "src") -> HostArray:
    """Read an array and convert it to logical ``dtype`` (``None``: keep its own).

    Unlike :func:`load` this also accepts float64 and integer sources when a
    target ``dtype`` is given.
    """
    host = _read(spec, arg)
    if dtype is None:
        if host.dtype not in dtypes.STORAGE:
            raise InputError(f"{arg}: {os.fspath(spec)} holds {host.dtype} data; "
                             "choose a target type with --dtype float32 (or float16, bfloat16)")
        return host
    dtypes.check(dtype, "dtype")
    if host.dtype == dtype:
        return host
    if host.dtype in dtypes.STORAGE:
        wide = dtypes.to_float32(host.data, host.dtype)
    elif host.data.dtype.kind in _CONVERTIBLE_KINDS:
        with np.errstate(over="ignore"):
            wide = host.data.astype(np.float32)
    else:
        raise InputError(f"{arg}: cannot convert {host.dtype} data to {dtype}")
    return HostArray(dtypes.from_float32(wide, dtype), dtype, host.kind)


def _read(spec: str | os.PathLike, arg: str) -> HostArray:
    """Read an array whatever its element type; ``dtype`` is then the numpy/torch name."""
    path, key = split_spec(spec)
    if not path.is_file():
        raise InputError(f"{arg}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{arg}: cannot load {path.suffix or 'suffix-less'!r} files; "
                         f"supported: {', '.join(FORMATS)}")
    try:
        if suffix in (".npy", ".bin"):
            _refuse_key(path, key)
            if suffix == ".npy":
                return _read_npy(path)
            data, dtype = binfmt.read_bin(path)
            return HostArray(data, dtype, "numpy")
        if suffix in (".pt", ".pth"):
            return pt.read(path, key)
        if suffix == ".safetensors":
            return safetensors.read(path, key)
        return h5.read(path, key)
    except InputError as exc:
        raise InputError(f"{arg}: {exc}") from exc


def _refuse_key(path: Path, key: str | None) -> None:
    if key is not None:
        raise InputError(f"{path} holds a single array; remove '#{key}' from the path")


def _read_npy(path: Path) -> HostArray:
    _check_npy_size(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError, SyntaxError, MemoryError) as exc:  # SyntaxError: tokenize
        raise InputError(f"cannot read {path} as a plain .npy array: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, np.ndarray):  # an .npz archive under a .npy name
        data.close()
        raise InputError(f"cannot read {path} as a plain .npy array: it is an .npz archive")
    return HostArray(native(data), dtype_label(data), "numpy")


def _check_npy_size(path: Path) -> None:
    """An .npy header must describe no more data than the file holds (checked before numpy
    allocates what a damaged header claims: 2^40 elements would be 4 TiB)."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                return  # not an .npy file: np.load says what it is
            f.seek(0)
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = header(f, max_header_size=1 << 16)
            start = f.tell()
    except Exception as exc:  # noqa: BLE001 - any damage to the header is refused the same way
        raise InputError(f"cannot read {path} as a plain .npy array: damaged header "
                         f"({type(exc).__name__}: {exc})") from None
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    have = path.stat().st_size - start
    if need > have:
        raise InputError(f"{path}: its header promises {need} bytes of data, the file holds {have} "
                         "(truncated or damaged)")


def save(spec: str | os.PathLike, host: HostArray) -> Path:
    """Write ``host`` to a file chosen by suffix; atomic. Returns the file's path.

    ``.h5``/``.hdf5``, ``.pt`` and ``.safetensors`` store it under the key
    after ``#`` (default ``"data"``, ``.pt`` default: a bare tensor) and keep the
    file's other arrays. ``.npy`` cannot hold bfloat16.
    """
    path, key = split_spec(spec)
    suffix = path.suffix.lower()
    dtypes.check(host.dtype, "dtype")
    if suffix == ".npy":
        _refuse_key(path, key)
        return _write_npy(path, host)
    if suffix == ".bin":
        _refuse_key(path, key)
        return binfmt.write_bin(path, host.data, host.dtype)
    if suffix in (".pt", ".pth"):
        return pt.write(path, host, key)
    if suffix == ".safetensors":
        return safetensors.write(path, host, key or "data")
    if suffix in (".h5", ".hdf5"):
        return h5.write(path, host, key or "data")
    raise InputError(f"cannot save {path.suffix or 'suffix-less'!r} files; supported: {', '.join(FORMATS)}")


def _write_npy(path: Path, host: HostArray) -> Path:
    if host.dtype == "bfloat16":
        raise InputError(f"cannot save bfloat16 to {path}: .npy has no bfloat16 type; "
                         "convert with --dtype float32, or save as .bin, .pt, .h5 or .safetensors")
    data = np.ascontiguousarray(host.data)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(data))
        write_array(f, data)
    return path


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None) -> Path:
    """Copy the array at ``src`` to ``dst`` (formats by suffix), optionally to ``dtype``.

    Conversions between dtypes go through float32 (rounding nearest-even).
    Returns ``dst``'s path.
    """
    return save(dst, load_as(src, dtype))


def convert_bin_matrix_to_pt(path: str | os.PathLike, pt_path: str | os.PathLike | None = None):
    """Read the ``.bin`` matrix at ``path`` and return it as a CPU torch tensor.

    bfloat16 files give a ``torch.bfloat16`` tensor. With ``pt_path`` the tensor
    is also saved there with ``torch.save`` (atomically). Needs torch.
    """
    data, dtype = binfmt.read_bin(path)
    tensor = pt.to_tensor(data, dtype)
    if pt_path is not None:
        pt.save_tensor(Path(pt_path), tensor)
    return tensor
