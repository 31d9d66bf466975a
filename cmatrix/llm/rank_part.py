"""What every rank-side decoder shares: the step's sum buffers and the decode profile.

A decoder (:class:`~cmatrix.llm.layers.RankDecoder`, or
:class:`~cmatrix.llm.ggml_decoder.GraphDecoder` on ggml ranks) runs one step as
``begin(x, start)``, then per layer ``attention(i, total, out)`` and
``mlp(i, total, out)``, then ``logits(total, all_rows)``. Each block first adds
``total`` (the previous block's output summed over ranks; None before the first
block) to the residual stream, then writes this rank's partial sum of its own
output into ``out``; the caller sums ``out`` across ranks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..engine.scheduling import RunDelay

#: the profile's phases, in the order they are reported
PHASES = ("matmul", "attention", "norms/rotary/elementwise", "collectives", "other")


#: K/V cache positions a decoder allocates before its first doubling
FIRST_CAPACITY = 256


def cache_capacity(current: int, needed: int, limit: int) -> int:
    """A K/V cache's new capacity: doubled from ``current`` (at least FIRST_CAPACITY) until it
    holds ``needed`` positions, never past ``limit`` (max_position_embeddings)."""
    cap = max(min(limit, FIRST_CAPACITY), current)
    while cap < needed:
        cap = min(2 * cap, limit)
    return cap


class StepProfile:
    """Seconds per phase over the decode steps since profiling began."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.wall = 0.0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t

    def step(self, seconds: float) -> None:
        self.steps += 1
        self.wall += seconds

    def report(self) -> dict:
        """Milliseconds per decode step by phase; "other" is the step's wall time not in a phase
        (Python between operations, the residual stream, copies)."""
        n = max(self.steps, 1)
        ms = {p: 1e3 * self.seconds.get(p, 0.0) / n for p in PHASES if p != "other"}
        ms["other"] = max(1e3 * self.wall / n - sum(ms.values()), 0.0)
        return {"steps": self.steps, "ms_per_token": 1e3 * self.wall / n, "phases": ms}


class RankCounters:
    """Running totals of a rank's decode steps, always kept (two clock reads per collective):
    what the dashboard's per-rank compute time per token comes from."""

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.collective_seconds = 0.0
        self.bytes_sent = 0

    def step(self, seconds: float, collective_seconds: float, bytes_sent: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.collective_seconds += collective_seconds
        self.bytes_sent += bytes_sent

    def report(self) -> dict:
        return {"steps": self.steps, "seconds": self.seconds, "collective_seconds": self.collective_seconds,
                "bytes_sent": self.bytes_sent}


class RankPart:
    """Mixin of the decoders: sum buffers reused between steps, running counters and an
    optional profile."""

    profile: StepProfile | None = None
    #: the profile while a decode step runs (None otherwise: prefills are not profiled)
    timing: StepProfile | None = None
    #: how this rank runs its blocks, for the profile
    kind = ""
    #: the type each block's partial sums travel in ("float32", "float16", "bfloat16")
    wire = "float32"
    _buffers: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None
    _counters: RankCounters | None = None
    #: the ranks that run the decoder's steps (the driver and those holding some of it), and
    #: their communicator (None on a rank outside it)
    members: list[int] = []
    group: Any = None
    #: in pipeline stages: this rank's part (see :class:`cmatrix.llm.pipeline.PipeRole`), else None
    pipe: Any = None
    #: the first layer this rank holds (its stage's, in pipeline stages): layer i is its i - first
    first = 0
    _run_delay: RunDelay | None = None
    #: :meth:`run_delay` when this rank's previous step ended (None before the first)
    held_mark: float | None = None

    def run_delay(self) -> float:
        """See :class:`RunDelay`."""
        if self._run_delay is None:
            self._run_delay = RunDelay()
        return self._run_delay()

    def leave_group(self) -> None:
        """Collective over the members: release the decoder's own communicator, if it has one."""
        free, self.group = getattr(self.group, "free", None), None
        if free is not None:
            free()
        if self.pipe is not None:
            self.pipe.leave()
            self.pipe = None

    @property
    def counters(self) -> RankCounters:
        if self._counters is None:
            self._counters = RankCounters()
        return self._counters

    def sum_buffers(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Two float32 buffers of ``size`` values plus a failure flag, reused while sizes match."""
        if self._buffers is None or self._buffers[0] != size:
            self._buffers = (size, (np.empty(size + 1, np.float32), np.empty(size + 1, np.float32)))
        return self._buffers[1]

    def decode_step_done(self, seconds: float, waited: float, sent: int, profile: StepProfile | None) -> None:
        """Count a decode step (``waited``: seconds of it in collectives and waits, ``sent``: bytes
        this rank put into them) in the running totals and in ``profile``, if profiling."""
        self.counters.step(seconds, waited, sent)
        if profile is not None:
            profile.add("collectives", waited)
            profile.step(seconds)

    def set_profile(self, enable: bool) -> None:
        """Start profiling decode steps afresh, or stop."""
        self.profile = StepProfile() if enable else None
        self.timing = None


def busy_seconds(elapsed: float, waited: float, held: float, held_before: float = 0.0) -> float:
    """How long a step held the others up on this rank's account: its compute time, plus the
    time the kernel kept it runnable but not running (a CPU quota, a busier program) outside
    its compute: ``held`` during the step (the part that fell in its waits) and ``held_before``
    since its previous step. A rank held back while the others need it in a collective delays
    them as much as slow arithmetic does."""
    return max(elapsed - waited, 0.0) + (held * waited / elapsed if elapsed > 0 else 0.0) + held_before


def format_profile(reports: list[dict]) -> str:
    """The per-rank profile as a table: milliseconds per decoded token by phase."""
    head = f"{'rank':>4} {'host':14} {'decoder':14} {'steps':>5} {'ms/token':>9} " + \
        " ".join(f"{p:>{max(len(p), 7)}}" for p in PHASES)
    lines = ["decode profile (ms per token; node-by-node on ggml ranks, so slower than a plain run):",
             head]
    for r in reports:
        if not r.get("steps"):
            lines.append(f"{r['rank']:>4} {r['host'][:14]:14} {r['backend']:14} {0:>5} (no decode steps)")
            continue
        phases = " ".join(f"{r['phases'][p]:>{max(len(p), 7)}.2f}" for p in PHASES)
        lines.append(f"{r['rank']:>4} {r['host'][:14]:14} {r['decoder'][:14]:14} {r['steps']:>5} "
                     f"{r['ms_per_token']:>9.2f} {phases}")
    return "\n".join(lines)
