"""Block quantisation in GGML's ``q8_0`` and ``q4_0`` layouts, in numpy.

Both formats cut each row into blocks of 32 values that share one float16
scale ``d``: ``q8_0`` stores ``round(x / d)`` as int8 (``d = max|x| / 127``),
``q4_0`` stores 4-bit codes ``q`` with ``x ~ (q - 8) * d`` where ``d`` is the
block's largest-magnitude value divided by -8. The byte layout and rounding
follow GGML's reference quantiser exactly, so blocks made here and blocks made
by ggml are interchangeable, and a backend without quantised kernels can hold
the dequantised values and compute the same products as one that has them.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

BLOCK = 32
KINDS = ("q8_0", "q4_0")
_BLOCK_DTYPE = {
    "q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))]),
    "q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK // 2,))]),
}
#: bytes per block of 32 values
BLOCK_BYTES = {kind: dt.itemsize for kind, dt in _BLOCK_DTYPE.items()}


def check_kind(kind: str, arg: str = "quant") -> str:
    if kind not in KINDS:
        raise InputError(f"{arg}: unknown quantisation {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def check_row_length(n: int, kind: str, what: str = "row") -> None:
    """Quantised rows are whole blocks: refuse a length that is not a multiple of 32."""
    if n % BLOCK:
        raise InputError(f"{kind} needs the {what} length to be a multiple of {BLOCK}, got {n} "
                         f"(pad it, or keep this matrix in float16/float32)")


#: float32 bytes of rows quantised at once: the temporaries stay a few MiB for any matrix
TILE_BYTES = 4 << 20


def quantize(x: np.ndarray, kind: str, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 ``x`` (row length a multiple of 32; any strides) -> uint8 blocks, one row
    per row (into ``out`` if given), a tile of rows at a time."""
    rows, n = x.shape
    check_row_length(n, kind)
    if out is None:
        out = np.empty((rows, n // BLOCK * BLOCK_BYTES[kind]), dtype=np.uint8)
    step = max(1, TILE_BYTES // (4 * max(n, 1)))
    for start in range(0, rows, step):
        out[start:start + step] = _quantize_tile(x[start:start + step], kind)
    return out


def _quantize_tile(x: np.ndarray, kind: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    blocks = x.reshape(rows, n // BLOCK, BLOCK)
    out = np.empty((rows, n // BLOCK), dtype=_BLOCK_DTYPE[kind])
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "q8_0":
            d = np.abs(blocks).max(axis=2) / np.float32(127)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            v = blocks * inv[..., None]
            out["qs"] = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # C roundf
        else:
            pick = np.abs(blocks).argmax(axis=2)[..., None]  # first of equal magnitudes, as ggml
            d = np.take_along_axis(blocks, pick, axis=2)[..., 0] / np.float32(-8)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            codes = np.minimum(15, np.trunc(blocks * inv[..., None] + np.float32(8.5))).astype(np.uint8)
            out["qs"] = codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2:] << 4)
    out["d"] = d.astype(np.float16)
    return out.view(np.uint8).reshape(rows, -1)


def dequantize(q: np.ndarray, kind: str) -> np.ndarray:
    """uint8 blocks from :func:`quantize` -> float32 rows."""
    rows = q.shape[0]
    blocks = np.ascontiguousarray(q).view(_BLOCK_DTYPE[kind]).reshape(rows, -1)
    d = blocks["d"].astype(np.float32)[..., None]
    if kind == "q8_0":
        values = blocks["qs"].astype(np.float32) * d
    else:
        qs = blocks["qs"]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.float32)
        values = (codes - 8) * d
    return values.reshape(rows, -1)


def roundtrip(x: np.ndarray, kind: str, axis: int = 1) -> np.ndarray:
    """The float32 values ``x`` takes after quantisation in blocks along ``axis``."""
    if axis == 0:
        return np.ascontiguousarray(roundtrip(np.ascontiguousarray(x.T), kind, 1).T)
    return dequantize(quantize(x, kind), kind)
