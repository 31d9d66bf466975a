"""Will the model fit? Before any weight moves, every rank reports the memory it can still
use and how many bytes one weight value takes there; this module adds up what each rank's
share needs and refuses a plan that does not fit, naming the rank and suggesting shares
that do (pure arithmetic, no MPI).

A rank needs its rows of every weight matrix (as its backend stores them), its K/V cache
for ``context`` positions, and, on the driver, the embeddings and a float32 copy of the
largest matrix while it is read and sent. Ranks that draw on one pool (the RAM of a host,
or one memory cgroup, or one GPU) are checked together.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from ..core import quant as q
from ..core.plan import Plan
from ..engine.ranks import format_bytes
from ..errors import InputError
from .config import DecoderConfig
from .layout import matrix_splits

#: the K/V cache counted per rank, in positions (it grows as a conversation does)
CONTEXT = 4096
#: what a rank needs beyond its weights and cache: activations, buffers, ggml graphs
MARGIN = 1.05
OVERHEAD = 64 << 20


@dataclass(frozen=True)
class RankMemory:
    """What one rank reported: free bytes (None: unknown), the pool, bytes per weight value."""

    rank: int
    host: str
    backend: str
    free: int | None
    pool: str
    per_value: float


def _per_matrix(cfg: DecoderConfig, weights: Sequence[float], quant: str | None) -> dict[str, list[int]]:
    """Per matrix of a layer (and the LM head): the values each rank holds of it."""
    out = {}
    for part, (shape, axis, align) in matrix_splits(cfg, quant).items():
        if quant and axis == 1:  # the blocks run along the rows: whole blocks per rank
            align = math.lcm(align, q.BLOCK)
        counts = Plan.from_weights(shape[axis], weights, axis, align).counts
        out[part] = [c * shape[1 - axis] for c in counts]
    return out


def per_rank_values(cfg: DecoderConfig, weights: Sequence[float], quant: str | None) -> list[int]:
    """Weight values each rank holds, split as the decoder splits them."""
    held = [0] * len(weights)
    for part, values in _per_matrix(cfg, weights, quant).items():
        times = 1 if part == "lm_head" else cfg.num_layers
        for r, v in enumerate(values):
            held[r] += times * v
    return held


def fixed_bytes(cfg: DecoderConfig, weights: Sequence[float], quant: str | None, context: int) -> list[int]:
    """Per rank, what does not scale with bytes per value: K/V cache, overhead, the float32
    block each matrix arrives in before its backend stores it (the largest counts), and the
    driver's embeddings and its float32 copies of the largest matrix."""
    shape, axis, align = matrix_splits(cfg, quant)["qkv"]
    unit = (cfg.group_size + 2) * cfg.head_dim
    groups = [c // unit for c in Plan.from_weights(shape[axis], weights, axis, align).counts]
    cache = [cfg.num_layers * 2 * g * cfg.head_dim * context * 4 for g in groups]
    largest = max(rows * cols for (rows, cols), _, _ in matrix_splits(cfg, quant).values())
    arriving = [4 * max(values) for values in zip(*_per_matrix(cfg, weights, quant).values(), strict=True)]
    out = [c + a + OVERHEAD for c, a in zip(cache, arriving, strict=True)]
    out[0] += 4 * (cfg.vocab_size * cfg.hidden_size + 2 * largest)
    return out


def check(cfg: DecoderConfig, weights: Sequence[float], quant: str | None, dtype: str,
          reports: Sequence[RankMemory], context: int | None = None) -> None:
    """Refuse (InputError) a plan whose share does not fit a rank's memory, naming the rank,
    host, bytes needed and free, and suggesting shares that fit; ``CMATRIX_MEMORY_CHECK=0``
    skips the check."""
    if os.environ.get("CMATRIX_MEMORY_CHECK", "1") == "0":
        return
    context = min(cfg.max_positions, CONTEXT) if context is None else context
    pools = _pools(reports)
    short, values, fixed = _shortfalls(cfg, weights, quant, reports, pools, context)
    if not short:
        return
    stored = quant or dtype
    lines = [f"the model does not fit as {stored} with shares {[round(float(w), 3) for w in weights]}: "
             + "; ".join(text for _, text in short) + f" (weights, a K/V cache of {context} positions, "
             "and on rank 0 the embeddings)."]
    shares = _fitting(cfg, weights, quant, reports, pools, context, values, fixed)
    if shares is not None:
        text = ",".join(f"{s:g}" for s in shares)
        lines.append(f"Shares that fit: --weights {text} (weights={shares}).")
    else:
        lines.append("Found no shares that fit on these ranks: add ranks or memory, or store fewer bytes "
                     "per weight (quant='q4_0' keeps about 0.56 bytes per weight on every backend; "
                     "dtype='bfloat16' 2 bytes on ggml, OpenCL and torch ranks).")
    lines.append("CMATRIX_MEMORY_CHECK=0 skips this check.")
    raise InputError(" ".join(lines))


def fitted(cfg: DecoderConfig, weights: Sequence[float], quant: str | None,
           reports: Sequence[RankMemory], context: int | None = None) -> list[float] | None:
    """``weights`` where they fit every rank's memory, else the nearest shares that do (each
    rank capped at what it can hold, the rest spread over the others in proportion to their
    shares); None if none fit. ``CMATRIX_MEMORY_CHECK=0``: ``weights`` as given."""
    if os.environ.get("CMATRIX_MEMORY_CHECK", "1") == "0":
        return list(weights)
    context = min(cfg.max_positions, CONTEXT) if context is None else context
    pools = _pools(reports)
    short, values, fixed = _shortfalls(cfg, weights, quant, reports, pools, context)
    if not short:
        return list(weights)
    return _fitting(cfg, weights, quant, reports, pools, context, values, fixed)


def _pools(reports: Sequence[RankMemory]) -> dict[tuple[str, str], list[int]]:
    pools: dict[tuple[str, str], list[int]] = defaultdict(list)
    for m in reports:
        if m.free is not None:
            pools[(m.host, m.pool)].append(m.rank)
    return pools


def _fitting(cfg: DecoderConfig, weights: Sequence[float], quant: str | None, reports: Sequence[RankMemory],
             pools: dict[tuple[str, str], list[int]], context: int, values: list[int],
             fixed: list[int]) -> list[float] | None:
    # Heads and MLP rows split in whole units, so a share can hold a little more than its
    # fraction: shrink the caps of the ranks still short until the real split fits.
    scale = [1.0] * len(reports)
    for _ in range(20):
        shares = suggest(values, reports, fixed, pools, weights, scale)
        if shares is None:
            return None
        still = _shortfalls(cfg, shares, quant, reports, pools, context)[0]
        if not still:
            return shares
        for ranks in (pools[key] for key, _ in still):
            for r in ranks:
                scale[r] *= 0.9
    return None


def _shortfalls(cfg: DecoderConfig, weights: Sequence[float], quant: str | None,
                reports: Sequence[RankMemory], pools: dict[tuple[str, str], list[int]],
                context: int) -> tuple[list[tuple[tuple[str, str], str]], list[int], list[int]]:
    """The pools short of memory with ``weights`` ((pool, what to say) each), and the values
    and fixed bytes per rank."""
    values = per_rank_values(cfg, weights, quant)
    fixed = fixed_bytes(cfg, weights, quant, context)
    need = [int(MARGIN * (v * m.per_value + f)) for v, m, f in zip(values, reports, fixed, strict=True)]
    short = []
    for key, ranks in pools.items():
        free = min(reports[r].free for r in ranks)
        if sum(need[r] for r in ranks) > free:
            who = ", ".join(f"rank {r} ({reports[r].backend}) {format_bytes(need[r])}" for r in ranks)
            short.append((key, f"host {key[0]} ({key[1]}): {who} needed, {format_bytes(free)} free"))
    return short, values, fixed


def suggest(values: Sequence[int], reports: Sequence[RankMemory], fixed: Sequence[int],
            pools: dict[tuple[str, str], list[int]], weights: Sequence[float],
            scale: Sequence[float] | None = None) -> list[float] | None:
    """The shares nearest to ``weights`` that fit: each rank is capped at what it can hold (its
    pool's free memory less the pool's fixed needs, split among the pool's ranks in proportion
    to the bytes their shares would store) and what it cannot hold goes to the others in
    proportion to their shares. None if no shares fit."""
    total = sum(values)
    cap = [math.inf] * len(reports)
    for ranks in pools.values():
        room = max(min(reports[r].free for r in ranks) / MARGIN - sum(fixed[r] for r in ranks), 0.0)
        want = {r: weights[r] * reports[r].per_value for r in ranks}
        for r in ranks:
            part = want[r] / sum(want.values()) if sum(want.values()) > 0 else 1.0 / len(ranks)
            cap[r] = room * part / (total * reports[r].per_value)
            cap[r] *= 1.0 if scale is None else scale[r]
    shares = [float(w) for w in weights]
    for _ in range(len(shares)):
        over = sum(max(s - c, 0.0) for s, c in zip(shares, cap, strict=True))
        if over <= 1e-9:
            break
        shares = [min(s, c) for s, c in zip(shares, cap, strict=True)]
        open_ranks = [r for r in range(len(shares)) if shares[r] < cap[r]]
        base = sum(shares[r] for r in open_ranks) or len(open_ranks)
        for r in open_ranks:
            shares[r] += over * ((shares[r] if sum(shares[x] for x in open_ranks) else 1.0) / base)
    if any(s > c + 1e-9 for s, c in zip(shares, cap, strict=True)) or abs(sum(shares) - 1) > 1e-6:
        return None
    # three decimals, rounded down; the thousandths left go one at a time to the ranks with
    # a share and the most room left (never to a rank given none)
    milli = [math.floor(1000 * s + 1e-9) for s in shares]
    for _ in range(1000 - sum(milli)):
        open_ranks = [r for r in range(len(milli)) if weights[r] > 0 and (milli[r] + 1) / 1000 <= cap[r]]
        if not open_ranks:
            return None
        milli[max(open_ranks, key=lambda r: cap[r] - milli[r] / 1000)] += 1
    return [m / 1000 for m in milli]
