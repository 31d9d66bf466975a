"""Argument checks the driver runs before any data moves. Each raises
:class:`InputError` naming the argument and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError


def per_rank(size: int, value: Any, arg: str) -> list:
    """``value`` for every rank: one value for all, or a list with one entry per rank."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bool)) or not isinstance(value, Sequence):
        return [value] * size
    if len(value) != size:
        raise InputError(f"{arg}: needs one entry per rank ({size} ranks), "
                         f"got {len(value)}: {list(value)}")
    return list(value)


def check_inner(a_shape: tuple[int, int], transpose_a: bool, op_b_shape: tuple[int, int],
                transpose_b: bool) -> None:
    m, k_a = a_shape[::-1] if transpose_a else a_shape
    k_b, n = op_b_shape
    if k_a != k_b:
        raise InputError(
            f"matmul: inner dimensions differ: op(a) is {m}x{k_a} (transpose_a={transpose_a}) "
            f"but op(b) is {k_b}x{n} (transpose_b={transpose_b})")


def check_axis(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in (0, 1):
        raise InputError(f"{arg}: must be 0 (rows) or 1 (columns), got {value!r}")
    return int(value)


def check_flag(value: Any, arg: str) -> bool:
    if not isinstance(value, (bool, np.bool_, int, np.integer)) or value not in (0, 1):
        raise InputError(f"{arg}: expected True or False, got {value!r}")
    return bool(value)


def positive_int(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{arg}: a positive integer, got {value!r}")
    return int(value)
