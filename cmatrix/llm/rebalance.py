"""Rebalancing while generating: the driver watches how long each rank computes per token
and, when one stays slower than its share predicts (another program takes its CPU, a laptop
throttles), moves work to the faster ones between tokens.

Every decode step already brings back how long each rank kept the others waiting (its
compute time, plus the time the kernel held it back while they needed it; see
:func:`cmatrix.llm.commands.busy_seconds`). :class:`Balancer` keeps them; every
:data:`WINDOW` tokens (and :data:`WINDOW_SECONDS`) it fits each rank's time as ``fixed + share * per_share``
(:mod:`cmatrix.core.shares`) and, if the shares that equalise the predicted times would
make a token at least :data:`GAIN` faster, :func:`replan` loads the decoder again with
them: each rank's KV groups, MLP rows and vocabulary rows follow the new shares (ranks
with their own copy of the checkpoint read theirs; the driver sends the others), and the
K/V cache of every moved group moves with it. A rank given no share leaves the steps'
collectives altogether.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core import shares as sh
from .memory_plan import fitted, per_rank_values
from .moves import LlmKvGather, LlmKvScatter

#: decode steps per measurement (their mean is taken: a CPU quota stalls a rank for a long
#: moment once in a while, so the window must also span a few of the kernel's 100 ms quota
#: periods), and steps skipped after a (re)load
WINDOW = 6
WINDOW_SECONDS = 0.3
WARMUP = 2
#: the predicted gain that a re-plan must promise: a fraction of a token's time, and seconds
#: (below a millisecond, noise and the cost of moving outweigh it)
GAIN = 0.10
MIN_GAIN_S = 1e-3
#: past observations kept per rank for the fit (the latest at each share, from the last two
#: checks: older ones may predate a slowdown or its end): two give a line
HISTORY = 2
SAME_SHARE = 0.02


def speed_shares(cluster: Any, kind: str) -> tuple[list[float], list[float]]:
    """(shares for decoding ``kind`` weights, see :func:`cmatrix.core.shares.decode_shares`; each
    rank's rate in GB/s of its stored weights), from the ranks' speed profiles (``cmatrix bench``)."""
    profiles = cluster.speed_profiles()
    return sh.decode_shares(profiles, kind), [p["decode_gbps"][kind] for p in profiles]


def _log(text: str) -> None:
    print(f"cmatrix: {text}", file=sys.stderr, flush=True)


class Balancer:
    """The per-rank compute times of a decoder's steps, and the re-planning they may call for.
    ``enabled`` False only records (for the summary and the dashboard)."""

    def __init__(self, model: Any, enabled: bool, log: Callable[[str], Any] = _log) -> None:
        self.model, self.enabled, self.log = model, enabled, log
        #: per decode step since the last (re)load: each rank's compute seconds (0: no part);
        #: ``window`` the steps not yet weighed by :meth:`check`
        self.recent: deque[list[float]] = deque(maxlen=256)
        self.window: list[list[float]] = []
        #: per rank: (fraction of the weights held, mean step seconds, check number) of the last
        #: :data:`HISTORY` checks
        self.history: list[list[tuple[float, float, int]]] = [[] for _ in range(model.cluster.size)]
        #: what each re-plan did, one line each
        self.moves: list[str] = []
        #: seconds a re-plan is expected to take: the last one's, at first the model's load time
        self.cost = 0.0
        self._seen, self._since, self._checks = 0, 0.0, 0

    def observe(self, seconds: list[float], tokens: int) -> None:
        """Record one step's per-rank compute seconds (only decode steps count)."""
        if tokens == 1:
            self._seen += 1
            if self._seen > WARMUP:
                if not self.window:
                    self._since = time.perf_counter()
                self.recent.append(seconds)
                self.window.append(seconds)

    def reset(self) -> None:
        self.recent.clear()
        self.window, self._seen = [], 0

    def per_rank_ms(self, last: int | None = None) -> list[float | None]:
        """Mean milliseconds per decode token each rank kept the others waiting (None: no part or no
        steps); see :func:`cmatrix.llm.commands.busy_seconds`."""
        steps = list(self.recent)[-last:] if last else list(self.recent)
        if not steps:
            return [None] * self.model.cluster.size
        mean = np.mean(np.asarray(steps), axis=0)
        return [1e3 * float(m) if r in self.model.members else None for r, m in enumerate(mean)]

    def imbalance(self, ms: list[float | None]) -> float:
        """The slowest rank's compute time over the mean of the ranks that hold work (0: unknown)."""
        held = self.fractions()
        busy = [m for m, f in zip(ms, held, strict=True) if m is not None and f > 0]
        return max(busy) / (sum(busy) / len(busy)) if busy and sum(busy) > 0 else 0.0

    def fractions(self) -> list[float]:
        """Each rank's fraction of the weight values, as the decoder is split now."""
        held = per_rank_values(self.model.config, self.model.weights, self.model.quant)
        return [v / sum(held) for v in held]

    def check(self, remaining: int | None = None) -> str | None:
        """Between tokens: re-plan if a full window shows a worthwhile gain; the log line, or None.
        ``remaining``: tokens still to come (None: no end in sight); a re-plan must save more
        time over them than it costs (the last re-plan's time, at first the model's load time)."""
        if not self.enabled or len(self.window) < WINDOW \
                or time.perf_counter() - self._since < WINDOW_SECONDS:
            return None
        model = self.model
        times = np.mean(np.asarray(self.window), axis=0)
        held = self.fractions()
        self._checks += 1
        for r in model.members:
            if held[r] > 0:  # a newer time at (about) the same share replaces the older: things change
                kept = [(s, t, n) for s, t, n in self.history[r]
                        if abs(s - held[r]) > SAME_SHARE and n >= self._checks - HISTORY + 1]
                self.history[r] = (kept + [(held[r], float(times[r]), self._checks)])[-HISTORY:]
        self.window = []
        costs = []
        for r in range(model.cluster.size):
            seen = self.history[r]
            if seen:
                costs.append(sh.fit([s for s, _, _ in seen], [t for _, t, _ in seen]))
            else:  # never measured with a share (given none from the start): keep it out
                costs.append(sh.RankCost(float("inf"), 1.0))
        allowed = [np.isfinite(c.fixed) for c in costs]
        target = sh.balanced(costs, allowed)
        target = fitted(model.config, target, model.quant, model.memory_ranks) or list(model.weights)
        now = max(float(times[r]) for r in model.members)
        new_held = per_rank_values(model.config, target, model.quant)
        predicted = sh.makespan(costs, [v / sum(new_held) for v in new_held])
        if predicted > now * (1 - GAIN) or now - predicted < MIN_GAIN_S \
                or np.allclose(target, model.weights, atol=1e-3):
            return None
        if remaining is not None and (now - predicted) * remaining < self.cost:
            return None  # it would not pay for itself before the end
        before = model.layout()
        speeds = ", ".join(f"rank {r} {1e3 * times[r]:.1f} ms for {held[r]:.2f} of the weights"
                           for r in model.members)
        old = ",".join(f"{w:g}" for w in model.weights)
        took = replan(model, target)
        self.cost = took
        self.reset()
        line = (f"rebalanced after {model.position} positions: {speeds} per token; shares {old} -> "
                f"{','.join(f'{w:g}' for w in target)} ({describe_moves(before, model.layout())}; "
                f"{1e3 * now:.1f} ms/token predicted to become {1e3 * predicted:.1f}; took {took:.2f} s)")
        self.moves.append(line)
        self.log(line)
        return line


def describe_moves(before: list[dict], after: list[dict]) -> str:
    """What changed hands, e.g. "KV groups: rank 1 -2, rank 0 +2; MLP rows: ..."."""
    parts = []
    kinds = (("kv_groups", "KV groups"), ("mlp_rows", "MLP rows"), ("vocab_rows", "vocabulary rows"))
    for key, what in kinds:
        delta = [a[key] - b[key] for a, b in zip(after, before, strict=True)]
        gained = [f"rank {r} +{d}" for r, d in enumerate(delta) if d > 0]
        lost = [f"rank {r} {d}" for r, d in enumerate(delta) if d < 0]
        if gained or lost:
            parts.append(f"{what}: {', '.join(lost + gained)}")
    return "; ".join(parts) or "nothing moved"


def replan(model: Any, weights: Sequence[float]) -> float:
    """Load ``model`` again split by ``weights``, its K/V cache moved along; the seconds it took.
    The old parts are freed before the new ones are placed, so no rank holds both; the blocks
    come from the checkpoint (each rank with its own copy reads its own), whatever ``cache=``
    the model was loaded with.

    If anything fails on the way (or Ctrl-C), the model is closed, the error says so, and it
    must be loaded again: no rank keeps half of it."""
    began = time.perf_counter()
    d = model.cluster.driver
    unit = (model.config.group_size + 2) * model.config.head_dim
    length = model.position
    old_groups = tuple(c // unit for c in model._qkv_counts)
    kv = d.run(LlmKvGather(model._id, length, old_groups)) if length else None
    model.release_parts()
    try:
        model.weights = np.asarray(weights, dtype=np.float64)
        with model.checkpoint_open():
            model._load()
        if length:
            d.run(LlmKvScatter(model._id, length, tuple(c // unit for c in model._qkv_counts)), kv)
    except BaseException:
        model.abandon()
        print("cmatrix: re-planning the model across the ranks failed, so it was closed: load it again",
              file=sys.stderr, flush=True)
        raise
    return time.perf_counter() - began
