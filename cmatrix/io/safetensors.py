"""``.safetensors`` files, parsed and written here (no extra package needed).

Layout: an unsigned 64-bit little-endian header length ``N``; ``N`` bytes of
UTF-8 JSON ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
"__metadata__": {...}}``; then the data buffer, each tensor little-endian and
row-major at ``[begin, end)`` relative to the buffer's start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..core.arrays import HostArray
from ..errors import InputError
from .atomic import atomic_path, write_array
from .reading import choose_key, dtype_label, native

#: safetensors dtype -> little-endian numpy storage (BF16: uint16 bits)
DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}
#: logical dtype -> safetensors dtype, for writing
CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_HEADER_BYTES = 100 << 20
METADATA = "__metadata__"


class Index:
    """A parsed, validated header: ``entries`` by name, where the data buffer starts."""

    def __init__(self, entries: dict[str, dict], metadata: Any, data_start: int) -> None:
        self.entries, self.metadata, self.data_start = entries, metadata, data_start

    def read(self, path: Path, name: str) -> np.ndarray:
        e = self.entries[name]
        dt = DTYPES[e["dtype"]]
        count = math.prod(e["shape"])
        data = np.fromfile(path, dtype=dt, count=count, offset=self.data_start + e["data_offsets"][0])
        return native(data.reshape(e["shape"]))


    def read_rows(self, path: Path, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of tensor ``name`` (along its first dimension), reading only their bytes."""
        e = self.entries[name]
        dt = DTYPES[e["dtype"]]
        shape = e["shape"]
        line = math.prod(shape[1:])
        lo, hi = max(0, min(lo, shape[0])), max(0, min(hi, shape[0]))
        hi = max(lo, hi)
        data = np.fromfile(path, dtype=dt, count=(hi - lo) * line,
                           offset=self.data_start + e["data_offsets"][0] + lo * line * dt.itemsize)
        return native(data.reshape(hi - lo, *shape[1:]))


def read_index(path: Path) -> Index:
    """Parse and validate the header of the safetensors file at ``path``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(first, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _corrupt(path, f"header length {n} does not fit in the file's {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not JSON, nested without end, a number too long
        raise _corrupt(path, "header is not JSON (or nests too deep, or a number is too long): "
                             f"{type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop(METADATA, None)
    buffer = size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, buffer)
    return Index(header, metadata, 8 + n)


def _check_entry(path: Path, name: str, e: Any, buffer: int) -> None:
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise _corrupt(path, f"entry {name!r} lacks dtype, shape or data_offsets")
    if e["dtype"] not in DTYPES:
        raise InputError(f"{path}: tensor {name!r} has dtype {e['dtype']!r}, which cmatrix cannot "
                         f"read; readable: {', '.join(DTYPES)}")
    shape, offsets = e["shape"], e["data_offsets"]
    if not (isinstance(shape, list) and all(_natural(d) for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= buffer:
        raise _corrupt(path, f"tensor {name!r} lies at bytes [{begin}, {end}) of a {buffer}-byte "
                       "data buffer (truncated file?)")
    expected = math.prod(shape) * DTYPES[e["dtype"]].itemsize
    if end - begin != expected:
        raise _corrupt(path, f"tensor {name!r} of shape {shape} and dtype {e['dtype']} needs "
                       f"{expected} bytes, its offsets give {end - begin}")


def _natural(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(f"corrupt safetensors file {path}: {why}")


def read(path: Path, key: str | None) -> HostArray:
    """The tensor named ``key``, or the file's only tensor."""
    index = read_index(path)
    name = choose_key(path, list(index.entries), key)
    data = index.read(path, name)
    return HostArray(data, dtype_label(data, bfloat16=index.entries[name]["dtype"] == "BF16"), "numpy")


def write(path: Path, host: HostArray, key: str) -> Path:
    """Store ``host`` as tensor ``key``; the file's other tensors and metadata are kept."""
    if key == METADATA:
        raise InputError(f"{path}: {METADATA!r} is reserved in safetensors files; pick another name")
    arrays: dict[str, tuple[str, np.ndarray]] = {}
    metadata = None
    if path.is_file():
        index = read_index(path)
        metadata = index.metadata
        for name, e in index.entries.items():
            if name != key:
                arrays[name] = (e["dtype"], index.read(path, name))
    arrays[key] = (CODES[host.dtype], np.ascontiguousarray(host.data))
    header: dict[str, Any] = {} if metadata is None else {METADATA: metadata}
    offset = 0
    for name, (code, data) in arrays.items():
        span = [offset, offset + data.nbytes]
        header[name] = {"dtype": code, "shape": list(data.shape), "data_offsets": span}
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for code, data in arrays.values():
            write_array(f, data.astype(DTYPES[code], copy=False))
    return path
