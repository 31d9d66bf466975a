"""Per-rank shares ("weights", the seed's percentages) -> exact block counts.

Pure numpy, no MPI: every rank can compute the same plan from the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

WEIGHT_SUM_TOLERANCE = 1e-6


def validate_weights(weights: Sequence[float], world_size: int, arg: str = "weights") -> np.ndarray:
    """Check per-rank shares and return them as float64.

    One share per rank, each finite and non-negative, summing to 1 within 1e-6.
    A share of 0 is legal: that rank holds nothing of the matrix.
    """
    try:
        w = np.asarray(list(weights), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{arg}: expected a list of numbers, got {weights!r}") from exc
    if w.ndim != 1 or len(w) != world_size:
        raise InputError(
            f"{arg}: needs one share per rank ({world_size} ranks), got {len(w)}: {list(w)}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError(f"{arg}: shares must be finite and >= 0, got {list(w)}")
    total = float(w.sum())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise InputError(
            f"{arg}: shares must sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}), they sum to "
            f"{total:.6g}; e.g. use [x / sum(w) for x in w]"
        )
    return w


def equal_weights(world_size: int) -> np.ndarray:
    return np.full(world_size, 1.0 / world_size)


def split_counts(total: int, weights: Sequence[float], align: int = 1) -> np.ndarray:
    """Split ``total`` items into per-rank counts proportional to ``weights``.

    Largest-remainder rounding: counts are exact integers summing to ``total``;
    a zero share always gets 0. With ``align`` > 1 counts are multiples of
    ``align`` (a quantisation block), except that the leftover ``total % align``
    goes to the last rank with a non-zero share.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or align < 1:
        raise InputError(f"cannot split {total} items in blocks of {align}")
    units, leftover = divmod(total, align)
    ideal = w / w.sum() * units
    counts = np.floor(ideal).astype(np.int64)
    short = units - int(counts.sum())
    if short:
        # Largest fractional part first; ties (up to float noise) go to the lower rank.
        order = np.argsort(-np.round(ideal - counts, 9), kind="stable")
        order = order[w[order] > 0]
        counts[order[:short]] += 1
    counts *= align
    if leftover:
        counts[np.flatnonzero(w > 0)[-1]] += leftover
    return counts


@dataclass(frozen=True)
class Plan:
    """How one axis of a matrix is divided among ranks."""

    axis: int
    counts: tuple[int, ...]

    @classmethod
    def from_weights(cls, total: int, weights: Sequence[float], axis: int, align: int = 1) -> Plan:
        return cls(axis, tuple(int(c) for c in split_counts(total, weights, align)))

    @property
    def displs(self) -> tuple[int, ...]:
        return tuple(int(d) for d in np.concatenate([[0], np.cumsum(self.counts)[:-1]]))

    def block(self, rank: int) -> slice:
        start = self.displs[rank]
        return slice(start, start + self.counts[rank])

    def block_shape(self, shape: tuple[int, int], rank: int) -> tuple[int, int]:
        dims = list(shape)
        dims[self.axis] = self.counts[rank]
        return (dims[0], dims[1])


def head_plans(kv_heads: int, n_rep: int, head_dim: int, weights: Sequence[float],
               size: int) -> tuple[Plan, Plan]:
    """(q plan, k/v plan) of attention split by heads: whole key/value groups per rank in
    proportion to ``weights`` (each group: one key/value head and its ``n_rep`` query heads)."""
    w = validate_weights(weights, size)
    groups = split_counts(kv_heads, w)
    kv = Plan(1, tuple(int(g) * head_dim for g in groups))
    return Plan(1, tuple(c * n_rep for c in kv.counts)), kv
