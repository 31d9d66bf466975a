"""Shares from measured speed (pure arithmetic, no MPI, no I/O).

A rank's time for one step of work is modelled as ``fixed + share * per_share``: the
seconds it spends whatever its share (a rank that a CPU quota stops for part of every
period pays them in every collective) plus the seconds its share of the work takes.
The shares that finish together are found by filling the ranks up to a common time,
so a rank whose fixed time alone exceeds it gets no share at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

#: shares are rounded to this many decimals (they are typed back as --weights)
DECIMALS = 3
#: the weight types a speed profile measures; "16bit" is bfloat16, or float16 where the backend
#: lacks it (see :mod:`cmatrix.ops.speed`)
KINDS = ("float32", "16bit", "q8_0", "q4_0")
#: what shares are for: one-row products (LLM decoding) or many-row ones (prefill, GEMM jobs)
WORKS = ("decode", "gemm")


def kind_of(dtype: str, quant: str | None) -> str:
    """The profile kind that stands for weights of ``dtype`` or ``quant``."""
    return quant or ("float32" if dtype == "float32" else "16bit")


#: a rank measured slower than this fraction of the fastest gets no share of LLM decoding: what
#: it would take off the others is less than what joining every step costs it
MIN_SHARE = 0.05
#: nor does a rank the kernel held back more than this fraction of the time while it measured
#: (and clearly more than the least held rank: ranks sharing too few cores are all held alike):
#: a decode step needs every rank twice per layer, and such a rank is often not running then
HELD_LIMIT = 0.5


def decode_shares(profiles: Sequence[dict], kind: str = "float32") -> list[float]:
    """Shares for LLM decoding: proportional to the decode rate on ``kind`` weights, except that
    ranks much slower than the fastest, or held back most of the time, get none."""
    rates = [p["decode"][kind] for p in profiles]
    held = [float(p.get("held") or 0.0) for p in profiles]
    kept = [0.0 if r < MIN_SHARE * max(rates) or (h > HELD_LIMIT and h > 2 * min(held) + 0.1) else r
            for r, h in zip(rates, held, strict=True)]
    return proportional(kept if any(kept) else rates)


def suggested(profiles: Sequence[dict], work: str = "decode", kind: str = "float32") -> list[float]:
    """Shares proportional to each rank's measured rate (its speed profile) for ``work`` on
    ``kind`` weights."""
    if work not in WORKS or kind not in KINDS:
        raise InputError(f"work: one of {WORKS}, kind: one of {KINDS}; got {work!r}, {kind!r}")
    return proportional([p[work][kind] for p in profiles])


def proportional(speeds: Sequence[float]) -> list[float]:
    """Shares proportional to ``speeds`` (bytes/s, flop/s: any rate), rounded to
    :data:`DECIMALS` decimals and summing to exactly 1."""
    v = np.asarray(list(speeds), dtype=np.float64)
    if v.ndim != 1 or not v.size or not np.all(np.isfinite(v)) or np.any(v < 0) or v.sum() <= 0:
        raise InputError(f"speeds: finite, non-negative and not all zero, got {list(speeds)}")
    return rounded(v / v.sum())


def rounded(shares: Sequence[float]) -> list[float]:
    """``shares`` to :data:`DECIMALS` decimals, still summing to 1: the units lost to rounding
    go to the largest remainders; a zero share stays zero."""
    s = np.asarray(list(shares), dtype=np.float64)
    scale = 10 ** DECIMALS
    units = np.floor(s / s.sum() * scale + 1e-9).astype(np.int64)
    short = scale - int(units.sum())
    order = [r for r in np.argsort(-(s / s.sum() * scale - units), kind="stable") if s[r] > 0]
    for r in order[:short]:
        units[r] += 1
    return [float(u) / scale for u in units]


@dataclass(frozen=True)
class RankCost:
    """One rank's measured step time model: ``fixed + share * per_share`` seconds."""

    fixed: float
    per_share: float

    def time(self, share: float) -> float:
        return 0.0 if share <= 0 else self.fixed + share * self.per_share


def fit(shares: Sequence[float], seconds: Sequence[float], fixed_floor: float = 0.0) -> RankCost:
    """A rank's cost from its step times at one or more shares: with one share (or all alike) the
    time is taken as proportional to the share; with two or more, a least-squares line, its
    fixed part kept between ``fixed_floor`` and the smallest time seen."""
    s = np.asarray(list(shares), dtype=np.float64)
    t = np.asarray(list(seconds), dtype=np.float64)
    keep = s > 0
    s, t = s[keep], t[keep]
    if not s.size:
        raise InputError("fit: no step time measured at a non-zero share")
    if np.ptp(s) < 1e-6:
        return RankCost(fixed_floor, max(float(np.mean(t)) - fixed_floor, 0.0) / float(np.mean(s)))
    slope, intercept = np.polyfit(s, t, 1)
    fixed = float(np.clip(intercept, fixed_floor, t.min()))
    per_share = max(float(np.sum((t - fixed) * s) / np.sum(s * s)), 1e-12)
    return RankCost(fixed, per_share)


def balanced(costs: Sequence[RankCost], allowed: Sequence[bool] | None = None) -> list[float]:
    """The shares that make every rank with work finish at the same time (the smallest such
    time): rank r gets ``(T - fixed_r) / per_share_r`` for the common time T, and none when its
    fixed time alone reaches T. ``allowed``: False for ranks that must get no share."""
    n = len(costs)
    ok = [True] * n if allowed is None else list(allowed)
    order = sorted((r for r in range(n) if ok[r]), key=lambda r: costs[r].fixed)
    if not order:
        raise InputError("balanced: no rank may take a share")
    best: tuple[float, list[float]] | None = None
    for k in range(1, len(order) + 1):  # the k ranks with the least fixed time take the work
        used = order[:k]
        inv = sum(1.0 / costs[r].per_share for r in used)
        common = (1.0 + sum(costs[r].fixed / costs[r].per_share for r in used)) / inv
        if any(common < costs[r].fixed for r in used):
            continue
        shares = [0.0] * n
        for r in used:
            shares[r] = (common - costs[r].fixed) / costs[r].per_share
        if best is None or common < best[0] - 1e-15:
            best = (common, shares)
    assert best is not None  # k = 1 always qualifies
    return rounded(best[1])


def makespan(costs: Sequence[RankCost], shares: Sequence[float]) -> float:
    """Predicted step time: the slowest rank's."""
    return max(c.time(s) for c, s in zip(costs, shares, strict=True))
