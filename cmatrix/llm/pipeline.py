"""Pipeline stages on the ranks (see :mod:`cmatrix.llm.stages` for the layout), both halves
of the link probe that ``parallel="auto"`` decides by.

A step: the driver sends the new tokens' embeddings to the first stage's leader; each
stage's leader broadcasts what it received to its stage, the stage runs its layers
(each block summed over the stage only), and the leader sends the residual stream on.
The driver's stage is last: it computes the logits. Failure flags travel with the data,
and the closing gather of the logits tells the driver which ranks failed
(:meth:`~cmatrix.engine.runtime.Runtime.settle`): a step crosses each link once and
needs no collective over the whole job.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.plan import Plan
from ..core.shares import kind_of
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import InputError
from . import stages as st
from .layout import matrix_values
from .rank_part import busy_seconds
from .stages import Links, Stage


@dataclass
class PipeRole:
    """What one rank does in a pipeline: its stage's communicator (the leader is its rank 0)
    and, on leaders, where the stream comes from and goes to (ranks of the decoder's group)."""

    stage: Any
    first: int
    end: int
    leader: bool
    prev: int
    next: int | None
    first_leader: int
    #: the o_proj and down_proj biases of its layers: the leader adds them to the stream
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    _buffer: np.ndarray | None = None

    def buffer(self, size: int) -> np.ndarray:
        """``size`` float32 values and a failure flag, reused while the size matches."""
        if self._buffer is None or self._buffer.size != size + 1:
            self._buffer = np.empty(size + 1, dtype=np.float32)
        return self._buffer

    def leave(self) -> None:
        """Collective over the stage: free its communicator."""
        if self.stage is not None:
            self.stage.free()
            self.stage = None


def join(comm: Any, stages: list[Stage], members: list[int],
         vectors: dict[str, np.ndarray]) -> PipeRole | None:
    """Collective over the whole job: this rank's role (None on a rank in no stage)."""
    me = comm.rank
    index = next((k for k, s in enumerate(stages) if me in s.ranks), None)
    stage_comm = comm.split(index)
    if index is None:
        return None
    s, group = stages[index], {w: g for g, w in enumerate(members)}
    last = index == len(stages) - 1
    biases = {name: v for name, v in vectors.items()
              if name.endswith((".o_bias", ".down_bias")) and s.first <= int(name.split(".")[0]) < s.end}
    return PipeRole(stage_comm, s.first, s.end, me == s.ranks[0],
                    prev=0 if index == 0 else group[stages[index - 1].ranks[0]],
                    next=None if last else group[stages[index + 1].ranks[0]],
                    first_leader=group[stages[0].ranks[0]], biases=biases)


def pipeline_step(rt: Runtime, model: Any, h: Any, x: np.ndarray | None) -> np.ndarray | None:
    """Rank half of ``llm_step`` for a decoder in pipeline stages (run within its group)."""
    comm, role = rt.comm, model.pipe
    size = h.shape[0] * h.shape[1]
    began, held = time.perf_counter(), model.run_delay()
    before = held - model.held_mark if model.held_mark is not None else 0.0
    sent, waited = comm.bytes_sent, 0.0
    prof = model.profile if h.shape[0] == 1 else None
    model.timing = prof
    buf = role.buffer(size)
    t = time.perf_counter()
    if comm.is_driver:
        buf[:size] = x.reshape(-1)
        buf[-1] = 1 if rt.failed else 0
        comm.send(buf, role.first_leader)
    if role.leader:
        comm.recv(buf, role.prev)
    role.stage.bcast(buf, yielding=True)
    waited += time.perf_counter() - t
    failed = bool(buf[-1] != 0) or rt.failed
    total = None
    if not failed:
        x_in = buf[:size].reshape(h.shape)
        with rt.step("attention"):
            model.begin(x_in, h.start)
        stream = x_in.copy() if role.leader and role.next is not None else None
        sums, which = model.sum_buffers(size), 0
        for i in range(role.first, role.end):
            for kind, block, bias in (("attention", model.attention, f"{i}.o_bias"),
                                      ("mlp", model.mlp, f"{i}.down_bias")):
                out, which = sums[which], 1 - which
                with rt.step(kind):
                    block(i, total, out[:size].reshape(h.shape))
                out[-1] = 1 if rt.failed else 0
                t = time.perf_counter()
                role.stage.allreduce(out, "sum")
                waited += time.perf_counter() - t
                if out[-1] != 0:
                    failed = True
                    break
                total = out[:size].reshape(h.shape)
                if stream is not None:
                    stream += total
                    if bias in role.biases:
                        stream += role.biases[bias]
            if failed:
                break
        if stream is not None and not failed:
            buf[:size] = stream.reshape(-1)
    if role.leader and role.next is not None:
        buf[-1] = 1 if failed or rt.failed else 0
        t = time.perf_counter()
        comm.send(buf, role.next)
        waited += time.perf_counter() - t
    return _gather_logits(rt, model, h, total, failed, (began, held, before, sent, waited, prof))


def _gather_logits(rt: Runtime, model: Any, h: Any, total: np.ndarray | None, failed: bool,
                   clocks: tuple) -> np.ndarray | None:
    """The last stage's logits and every member's busy seconds (NaN: it failed) to the driver."""
    comm, (began, held, before, sent, waited, prof) = rt.comm, clocks
    rows, own = (h.shape[0] if h.all_logits else 1), h.vocab_counts[comm.world_rank]
    logits = None
    if model.pipe.next is None and not failed:
        with rt.step("logits"):
            logits = model.logits(total, h.all_logits)
    part = np.zeros((rows, own + 1), dtype=np.float32)
    if logits is not None and logits.shape == (rows, own):
        part[:, :-1] = logits
    model.held_mark = model.run_delay()
    part[:, -1] = np.nan if rt.failed else busy_seconds(time.perf_counter() - began, waited,
                                                        model.held_mark - held, before)
    counts = tuple(h.vocab_counts[r] + 1 for r in model.members)
    full = np.empty((rows, sum(counts)), dtype=np.float32) if comm.is_driver else None
    comm.gather_blocks(part, full, Plan(1, counts), yielding=True)  # the early stages wait here
    failing = []
    if full is not None:
        ends = np.cumsum(counts) - 1
        failing = [g for g, end in enumerate(ends) if np.isnan(full[0, end])]
    rt.settle(failing)
    if h.shape[0] == 1:
        model.decode_step_done(time.perf_counter() - began, waited, comm.bytes_sent - sent, prof)
    return full


# ---- the link probe ------------------------------------------------------------------------

@dataclass(frozen=True)
class LlmLinks(Header, op="llm_links"):
    """Measure the links and each rank's streaming speed (see :func:`probe`)."""

    hidden: int                 # values in one Allreduce (a decode step's hidden state)
    leaders: tuple[int, ...]    # one rank per remote host: the driver pings each
    bulk: int = 1 << 18         # bytes of the bandwidth message
    repeats: int = 5


#: float32 values of the weight :func:`stream_rate` streams: 128 MiB, more than any CPU cache
STREAM_SHAPE = (16384, 2048)


def probe(driver: Any, hosts: list[str], hidden: int) -> tuple[Links, list[float]]:
    """Measure the links (see :class:`~cmatrix.llm.stages.Links`): a few Allreduces over every
    rank, and a ping and a bulk message to each remote host's first rank; and per rank, the
    bytes per second a decode-shaped float32 product streams (:func:`stream_rate`)."""
    leaders = {}
    for r, host in enumerate(hosts):
        if host != hosts[0]:
            leaders.setdefault(host, r)
    allreduce, trips, rates, streams = driver.run(LlmLinks(hidden, tuple(leaders.values())))
    names = list(leaders)
    links = Links(allreduce, dict(zip(names, trips, strict=True)), dict(zip(names, rates, strict=True)))
    return links, streams


def stream_rate(dev: Any, seconds: float = 0.3) -> float:
    """Bytes per second this rank's decoder streams in a decode-shaped float32 product over a
    weight larger than any cache. A speed profile's products fit in a large L3 cache, so they
    overstate what a whole model's layers run at; the shares between ranks and weight types
    still come from the profile."""
    from ..backends import decode_device

    decoder, started = decode_device(dev)
    rows, cols = STREAM_SHAPE
    block = np.random.default_rng(0).standard_normal((1024, cols), dtype=np.float32) * 0.05
    w = x = None
    try:
        w = decoder.upload(np.tile(block, (rows // 1024, 1)), "float32")
        x = decoder.upload(block[:1], "float32")

        def product() -> None:
            y = decoder.matmul(x, w, transpose_b=True, partial=True)
            decoder.download(y, "float32")
            decoder.free(y)

        product()
        calls, began = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - began < seconds:
            product()
            calls += 1
        return rows * cols * 4 * calls / (time.perf_counter() - began)
    finally:
        for h in (w, x):
            if h is not None:
                decoder.free(h)
        if started:
            decoder.backend.close()


@on_ranks(LlmLinks)
def _llm_links(rt: Runtime, h: LlmLinks, _: Any) -> tuple | None:
    comm = rt.comm
    streamed = 0.0
    with rt.step("stream"):  # every rank at once, as they decode
        streamed = stream_rate(rt.backend)
    rt.sync()
    values = np.zeros(h.hidden + 1, dtype=np.float32)
    times = []
    for _ in range(h.repeats + 1):
        t = time.perf_counter()
        comm.allreduce(values, "sum")
        times.append(time.perf_counter() - t)
    small, bulk = np.zeros(1, dtype=np.float32), np.zeros(h.bulk // 4, dtype=np.float32)
    trips, rates = [], []
    for leader in h.leaders:
        if comm.is_driver:
            ping, pour = [], []
            for _ in range(h.repeats + 1):
                t = time.perf_counter()
                comm.send(small, leader)
                comm.recv(small, leader)
                ping.append(time.perf_counter() - t)
            trip = statistics.median(ping[1:])
            for _ in range(3):
                t = time.perf_counter()
                comm.send(bulk, leader)
                comm.recv(small, leader)
                pour.append(time.perf_counter() - t)
            trips.append(trip)
            rates.append(h.bulk / max(min(pour) - trip, 1e-6))
        elif comm.rank == leader:
            for _ in range(h.repeats + 1):
                comm.recv(small, 0)
                comm.send(small, 0)
            for _ in range(3):
                comm.recv(bulk, 0)
                comm.send(small, 0)
    streams = comm.gather_objects(streamed)
    if not comm.is_driver:
        return None
    return statistics.median(times[1:]), trips, rates, streams


# ---- the driver's choice of layout -----------------------------------------------------------

def decide(model: Any, parallel: str) -> tuple[list[Stage] | None, str]:
    """The stages ``model`` runs in (None: tensor-parallel) and a line saying which ranks run
    which layers, and why. ``parallel``: "tp", "pp" or "auto" (see :mod:`cmatrix.llm.stages`)."""
    cl, cfg = model.cluster, model.config
    hosts = [info.host for info in cl.ranks]
    weights = [float(w) for w in model.weights]
    used = {hosts[r] for r, w in enumerate(weights) if w > 0} | {hosts[0]}
    if parallel == "tp":
        return None, "tensor-parallel over every rank (parallel='tp')"
    if parallel == "pp":
        stages = st.plan(hosts, weights, cfg.num_layers)
        if len(stages) == 1:
            return None, "tensor-parallel: one rank holds the whole model (stages need two or more)"
        if not any(weights[r] > 0 for r in stages[-1].ranks):
            raise InputError(f"parallel='pp': the driver's host ({hosts[0]}) runs the last stage and the LM "
                             "head, but its ranks have no share; give one of them a share, or use 'tp'")
        return stages, f"pipeline stages (parallel='pp'): {st.describe(stages, hosts)}"
    if len(used) == 1:
        return None, f"tensor-parallel: every rank with a share is on {hosts[0]} (parallel='auto')"
    if not any(w > 0 for r, w in enumerate(weights) if hosts[r] == hosts[0]):
        return None, (f"tensor-parallel (parallel='auto'): the driver's host ({hosts[0]}) holds no work, "
                      "and in stages it runs the last one")
    links, streams = probe(cl.driver, hosts, cfg.hidden_size)
    # each rank's speed for the model's weights: what it streams beyond its caches, scaled by
    # its profile's rate for this weight type against float32
    kind, profiles = kind_of(model.dtype, model.quant), cl.speed_profiles()
    speeds = [s / 1e9 * p["decode_gbps"][kind] / p["decode_gbps"]["float32"]
              for s, p in zip(streams, profiles, strict=True)]
    values = matrix_values(cfg, model.quant)
    mode, stages, why = st.choose(hosts, weights, [1e9 * s for s in speeds], cfg.num_layers,
                                  values * model.stored_bytes_per_value(), 4 * cfg.hidden_size,
                                  4 * cfg.vocab_size, links)
    if mode == "tp":
        return None, f"tensor-parallel (parallel='auto'): {why}"
    return stages, f"pipeline stages (parallel='auto'): {st.describe(stages, hosts)}; {why}"
