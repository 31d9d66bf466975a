"""The ``.bin`` matrix format: a small int32 header, then the raw elements.

Version 2 (what cmatrix writes)::

    int32 dtype_tag   -1 float32, -2 float16, -3 bfloat16 (raw uint16 bits)
    int32 batch
    int32 depth
    int32 rows
    int32 cols
    rows*cols*depth*batch elements, row-major (C order)

Legacy version 1 (read only)::

    int32 ndim        positive, 1..8
    int32 dims[ndim]
    float32 elements, row-major

Header and data are in the writing machine's native byte order (little-endian
on every machine cmatrix runs on). The dtype tag is negative so that a reader
tells the two versions apart by the sign of the first value.

A version 2 file reads back with its leading size-1 dimensions dropped, but
never below two dimensions: a ``rows x cols`` matrix round-trips as 2-D, and
1-D data is written (and read back) as one row. A file whose size is not
exactly header + elements is refused, so a truncated copy is never mistaken for
a smaller matrix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..core import dtypes
from ..errors import InputError
from .atomic import atomic_path, write_array

#: logical dtype -> version 2 tag
TAGS = {"float32": -1, "float16": -2, "bfloat16": -3}
DTYPE_OF_TAG = {tag: name for name, tag in TAGS.items()}
V2_HEADER_BYTES = 5 * 4
MAX_V1_NDIM = 8
_INT32_MAX = 2**31 - 1


class BinHeader(NamedTuple):
    """What a ``.bin`` header says: logical dtype, array shape, where the data starts."""

    dtype: str
    shape: tuple[int, ...]
    data_offset: int


def read_bin_header(path: str | os.PathLike) -> BinHeader:
    """Parse and validate the header of the ``.bin`` file at ``path``.

    Checks the tag (or legacy ndim) and the dimensions, and that the file
    holds exactly as many data bytes as the header promises.
    """
    p = Path(path)
    actual = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(4 + 4 * MAX_V1_NDIM)
    if len(head) < 4:
        raise InputError(f"{p}: not a .bin matrix: {actual} bytes, shorter than any header")
    first = int(np.frombuffer(head, np.int32, 1)[0])
    header = _v2_header(p, head, first, actual) if first < 0 else _v1_header(p, head, first, actual)
    itemsize = dtypes.ITEMSIZE[header.dtype]
    expected = header.data_offset + math.prod(header.shape) * itemsize
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise InputError(
            f"{p}: .bin file {what}: header says {header.dtype} {_shape_text(header.shape)}, "
            f"so expected {expected} bytes, got {actual} bytes"
        )
    return header


def _v2_header(p: Path, head: bytes, tag: int, actual: int) -> BinHeader:
    if tag not in DTYPE_OF_TAG:
        known = ", ".join(f"{t} ({n})" for t, n in DTYPE_OF_TAG.items())
        raise InputError(f"{p}: unknown .bin dtype tag {tag}; known tags: {known}")
    if len(head) < V2_HEADER_BYTES:
        raise InputError(f"{p}: .bin file truncated inside its header: expected at least "
                         f"{V2_HEADER_BYTES} bytes, got {actual} bytes")
    dims = [int(d) for d in np.frombuffer(head, np.int32, 4, offset=4)]
    _check_dims(p, dims)
    while len(dims) > 2 and dims[0] == 1:
        dims.pop(0)
    return BinHeader(DTYPE_OF_TAG[tag], tuple(dims), V2_HEADER_BYTES)


def _v1_header(p: Path, head: bytes, ndim: int, actual: int) -> BinHeader:
    if not 1 <= ndim <= MAX_V1_NDIM:
        raise InputError(f"{p}: not a .bin matrix: legacy header gives ndim {ndim}, "
                         f"expected 1..{MAX_V1_NDIM}")
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise InputError(f"{p}: .bin file truncated inside its header: expected at least "
                         f"{offset} bytes, got {actual} bytes")
    dims = [int(d) for d in np.frombuffer(head, np.int32, ndim, offset=4)]
    _check_dims(p, dims)
    return BinHeader("float32", tuple(dims), offset)


def _check_dims(p: Path, dims: list[int]) -> None:
    if any(d < 0 for d in dims):
        raise InputError(f"{p}: corrupt .bin header: negative dimension in {dims}")


def read_bin(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Read a ``.bin`` file: ``(storage array, logical dtype)``.

    bfloat16 comes back as ``uint16`` bits. The array owns its memory; the
    file is closed on return.
    """
    header = read_bin_header(path)
    storage = dtypes.STORAGE[header.dtype]
    count = math.prod(header.shape)
    data = np.fromfile(path, dtype=storage, count=count, offset=header.data_offset)
    return data.reshape(header.shape), header.dtype


def write_bin(path: str | os.PathLike, data: np.ndarray, dtype: str,
              on_chunk: Callable[[int], None] | None = None) -> Path:
    """Write ``data`` (storage of logical ``dtype``, 1 to 4 dims) as a version 2 ``.bin``.

    Dimensions are padded with leading 1s to ``(batch, depth, rows, cols)``;
    1-D data becomes one row. The file appears atomically. Returns its path.
    """
    if dtype not in TAGS:
        raise InputError(f"cannot write dtype {dtype!r} to .bin; supported: {', '.join(TAGS)}")
    data = np.asarray(data)
    if data.dtype != dtypes.STORAGE[dtype]:
        raise InputError(f"cannot write {dtype} to .bin: storage is {data.dtype}, "
                         f"expected {dtypes.STORAGE[dtype]}")
    if not 1 <= data.ndim <= 4:
        raise InputError(f"cannot write a {data.ndim}-D array to .bin: the format holds 1 to 4 dims")
    dims = (1,) * (4 - data.ndim) + tuple(data.shape)
    if max(dims) > _INT32_MAX:
        raise InputError(f"cannot write shape {data.shape} to .bin: a dimension exceeds int32")
    header = np.array([TAGS[dtype], *dims], dtype=np.int32)
    final = Path(path)
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        write_array(f, data, on_chunk)
    return final


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)
