"""Pipeline stages: a decoder's layers in contiguous ranges, one range per host (pure, no MPI).

Tensor parallelism sums every block across all ranks: two collectives per layer per
token, each crossing the network when the ranks sit on several hosts. A pipeline gives
each host (a *stage*) a contiguous range of layers, split tensor-parallel among that
host's ranks; a token's hidden state crosses the network once per stage. The driver's
host is the last stage, so it holds the LM head and the logits never cross a link.

:func:`choose` predicts the time per token of both layouts from the ranks' measured
decode speed and the links' measured cost, and picks the faster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError

#: what ``parallel=`` accepts
MODES = ("tp", "pp", "auto")


@dataclass(frozen=True)
class Stage:
    """Some ranks of one host, running layers [first, end) tensor-parallel among themselves."""

    ranks: tuple[int, ...]
    first: int
    end: int


def check_mode(parallel: str) -> str:
    """``parallel`` if it is one of :data:`MODES`, else an :class:`InputError`."""
    if parallel not in MODES:
        raise InputError(f"parallel: one of {', '.join(map(repr, MODES))}, got {parallel!r}")
    return parallel


def by_host(hosts: Sequence[str], weights: Sequence[float]) -> list[tuple[int, ...]]:
    """The ranks with a share, grouped by host in the order of each host's first rank, except
    that the driver's host (rank 0's, which must be one) comes last."""
    groups: dict[str, list[int]] = {}
    for r, (host, w) in enumerate(zip(hosts, weights, strict=True)):
        if w > 0 or r == 0:
            groups.setdefault(host, []).append(r)
    driver = groups.pop(hosts[0])
    return [tuple(g) for g in groups.values()] + [tuple(driver)]


def layer_counts(layers: int, speeds: Sequence[float], limits: Sequence[int] | None = None) -> list[int]:
    """``layers`` split into one contiguous count per stage, proportional to ``speeds``, at
    least one each and at most ``limits`` (what each stage's memory holds)."""
    n = len(speeds)
    limits = list(limits) if limits is not None else [layers] * n
    if n > layers:
        raise InputError(f"parallel='pp': {n} hosts but the model has only {layers} layers")
    if sum(limits) < layers or min(limits) < 1:
        raise InputError(f"parallel='pp': the hosts' memory holds {limits} layers, the model has {layers}")
    counts = [1] * n
    total = sum(speeds) or 1.0
    for _ in range(layers - n):  # each next layer to the stage furthest below its fair count
        open_ = [s for s in range(n) if counts[s] < limits[s]]
        s = max(open_, key=lambda s: (speeds[s] / total * layers - counts[s], -s))
        counts[s] += 1
    return counts


def plan(hosts: Sequence[str], weights: Sequence[float], layers: int,
         limits: Sequence[int] | None = None) -> list[Stage]:
    """One stage per host (see :func:`by_host`), its layer count proportional to the sum of
    its ranks' shares. On one host, one stage per rank (as llama.cpp splits layers across
    the GPUs of one machine), the driver's last."""
    groups = by_host(hosts, weights)
    if len(groups) == 1:
        groups = [(r,) for r in groups[0] if r != 0] + [(0,)]
    counts = layer_counts(layers, [sum(weights[r] for r in g) for g in groups], limits)
    stages, first = [], 0
    for group, count in zip(groups, counts, strict=True):
        stages.append(Stage(group, first, first + count))
        first += count
    return stages


def stage_of(stages: Sequence[Stage], layer: int) -> Stage:
    """The stage holding ``layer``."""
    return next(s for s in stages if s.first <= layer < s.end)


def layer_weights(stages: Sequence[Stage], weights: Sequence[float], layer: int | None) -> list[float]:
    """Per rank: its share of layer ``layer`` (None: of the LM head, on the last stage), zero
    outside the stage holding it. A stage whose ranks all have zero share splits evenly."""
    stage = stages[-1] if layer is None else stage_of(stages, layer)
    own = [float(weights[r]) if r in stage.ranks else 0.0 for r in range(len(weights))]
    if sum(own) <= 0:
        own = [1.0 if r in stage.ranks else 0.0 for r in range(len(weights))]
    return own


def stage_fractions(stages: Sequence[Stage], weights: Sequence[float], layers: int) -> list[float]:
    """Per rank, the fraction of the model's layers it holds in ``stages`` (its share of its
    stage's layers): what :mod:`cmatrix.llm.memory_plan` checks as a share."""
    out = [0.0] * len(weights)
    for s in stages:
        own = [float(weights[r]) for r in s.ranks]
        if sum(own) <= 0:  # split evenly, as layer_weights does
            own = [1.0] * len(own)
        for r, w in zip(s.ranks, own, strict=True):
            out[r] = (s.end - s.first) / layers * w / sum(own)
    return out


def describe(stages: Sequence[Stage], hosts: Sequence[str]) -> str:
    """``stage 1: ranks 1,2 on h2, layers 0-3; stage 2: rank 0 on h1, layers 4-7 + LM head``"""
    parts = []
    for k, s in enumerate(stages, 1):
        ranks = ",".join(map(str, s.ranks))
        head = " + LM head" if k == len(stages) else ""
        parts.append(f"stage {k}: rank{'s' if len(s.ranks) > 1 else ''} {ranks} on {hosts[s.ranks[0]]}, "
                     f"layers {s.first}-{s.end - 1}{head}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Links:
    """What the network costs, measured at load (seconds): one Allreduce of a hidden state
    over every rank; per remote host, a small message's round trip and bytes per second to
    and from the driver."""

    allreduce: float
    round_trip: dict[str, float]
    bandwidth: dict[str, float]


def _slowest(ranks: Sequence[int], weights: Sequence[float], speeds: Sequence[float], work: float) -> float:
    """Seconds until the last of ``ranks`` has read its part of ``work`` bytes, split among
    them by ``weights``: they run at once, and a step waits for the slowest."""
    total = sum(weights[r] for r in ranks) or 1.0
    return max((weights[r] / total * work / max(speeds[r], 1e-9) for r in ranks), default=0.0)


def predict(mode: str, stages: Sequence[Stage], hosts: Sequence[str], speeds: Sequence[float],
            model_bytes: float, layers: int, hidden_bytes: int, vocab_bytes: int, links: Links,
            weights: Sequence[float] | None = None) -> float:
    """Predicted seconds per decoded token. ``speeds``: each rank's decode rate (bytes/s of
    weights); ``model_bytes``: the layers' and head's weights as stored; ``weights``: the
    ranks' shares (default: proportional to ``speeds``).

    tp: every rank reads its share at once; two Allreduces per layer, and the remote ranks'
    logits cross the link. pp: the stages run one after another, each reading its layers
    (split among its ranks by their shares); the hidden state crosses one link per stage."""
    weights = list(speeds) if weights is None else list(weights)
    remote = {h for h in hosts if h != hosts[0]}
    slowest_trip = max((links.round_trip[h] for h in remote), default=0.0)
    slowest_rate = min((links.bandwidth[h] for h in remote), default=math.inf)
    if mode == "tp":
        compute = _slowest(range(len(hosts)), weights, speeds, model_bytes)
        remote_share = sum(w for w, host in zip(weights, hosts, strict=True) if host != hosts[0]) / \
            (sum(weights) or 1.0)
        gather = (slowest_trip / 2 + remote_share * vocab_bytes / slowest_rate) if remote else 0.0
        return compute + 2 * layers * links.allreduce + gather
    compute = sum(_slowest(s.ranks, weights, speeds, (s.end - s.first) / layers * model_bytes)
                  for s in stages)
    hops = sum(links.round_trip[hosts[s.ranks[0]]] / 2 + hidden_bytes / links.bandwidth[hosts[s.ranks[0]]]
               for s in stages[:-1]) + (slowest_trip / 2 if remote else 0.0)
    return compute + hops


def choose(hosts: Sequence[str], weights: Sequence[float], speeds: Sequence[float], layers: int,
           model_bytes: float, hidden_bytes: int, vocab_bytes: int, links: Links,
           limits: Sequence[int] | None = None) -> tuple[str, list[Stage], str]:
    """The layout ``parallel="auto"`` runs: ("tp" or "pp", the stages, why)."""
    stages = plan(hosts, weights, layers, limits)
    args = (hosts, speeds, model_bytes, layers, hidden_bytes, vocab_bytes, links, weights)
    tp, pp = predict("tp", stages, *args), predict("pp", stages, *args)
    mode = "pp" if pp < tp else "tp"
    why = (f"predicted {1e3 * pp:.1f} ms/token in pipeline stages against {1e3 * tp:.1f} tensor-parallel "
           f"(an Allreduce takes {1e3 * links.allreduce:.2f} ms, {2 * layers} per token)")
    return mode, stages, why
