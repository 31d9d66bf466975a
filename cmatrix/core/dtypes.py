"""Element types cmatrix computes with, and their host storage.

float16 lives in numpy as ``float16``; bfloat16 has no numpy type, so its bits
live in ``uint16`` arrays and the logical type travels beside the data.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

#: logical dtype name -> numpy storage dtype
STORAGE = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
}
SUPPORTED = tuple(STORAGE)
ITEMSIZE = {name: dt.itemsize for name, dt in STORAGE.items()}


def check(name: str, arg: str = "dtype") -> str:
    if name not in STORAGE:
        raise InputError(
            f"{arg}: unsupported dtype {name!r}; cmatrix computes in "
            f"{', '.join(SUPPORTED)} (convert first, e.g. x.astype(np.float32))"
        )
    return name


def promote(a: str, *others: str) -> str:
    """Result type of an operation on these dtypes (as torch promotes floats)."""
    return a if all(b == a for b in others) else "float32"


def empty(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An uninitialised host array of logical ``dtype``'s storage."""
    return np.empty(tuple(shape), dtype=STORAGE[dtype])


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


#: values rounded per pass of :func:`float32_to_bf16` (its scratch stays in the CPU's cache)
_BF16_CHUNK = 1 << 18


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits, nearest-even, NaN kept quiet."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.reshape(-1).view(np.uint32)
    rounded = np.empty(bits.shape, dtype=np.uint16)
    scratch = np.empty(min(_BF16_CHUNK, bits.size), dtype=np.uint32)
    for start in range(0, bits.size, _BF16_CHUNK):  # in place, a cache-sized piece at a time
        src = bits[start:start + _BF16_CHUNK]
        t = scratch[:src.size]
        np.right_shift(src, 16, out=t)
        np.bitwise_and(t, 1, out=t)
        np.add(t, 0x7FFF, out=t)
        np.add(t, src, out=t)
        np.right_shift(t, 16, out=t)
        rounded[start:start + src.size] = t
    nan = np.isnan(bits.view(np.float32))
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded.reshape(x.shape)


def to_float32(data: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored data of logical ``dtype`` to float32 (no copy for float32)."""
    if dtype == "float32":
        return data
    if dtype == "float16":
        return data.astype(np.float32)
    return bf16_to_float32(data)


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Narrow float32 to the storage of logical ``dtype``."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # overflow rounds to inf, as IEEE (and torch) do
            return np.ascontiguousarray(x, dtype=np.float16)
    return float32_to_bf16(x)
