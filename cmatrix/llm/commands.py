"""The decoder's commands, both halves: ``llm_load``, ``llm_step`` and ``llm_free``
(the driver's handle that issues them: :mod:`cmatrix.llm.model`).

``llm_load`` builds each rank's :class:`~cmatrix.llm.layers.RankDecoder` from weight
blocks already resident (sent by ``shard``) and one broadcast of the small vectors.
``llm_step`` runs every layer for a few new tokens: the embeddings are broadcast
once, each block ends with one Allreduce of a (tokens, hidden) array (which also
carries the ranks' failure flags), and the logits come back by vocabulary slices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import llm_path
from ..backends.hostmem import release_free_heap
from ..core.plan import Plan
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import CMatrixError
from . import local_weights
from .config import DecoderConfig
from .layers import RankDecoder
from .layout import unpack
from .pipeline import join, pipeline_step
from .rank_part import busy_seconds
from .stages import Stage, stage_of


@dataclass(frozen=True)
class LlmLoad(Header, op="llm_load"):
    model: int
    config: dict                        # DecoderConfig's fields
    layers: tuple[dict[str, int], ...]  # per layer: the resident blocks' ids by part
    lm_head: int
    qkv_counts: tuple[int, ...]
    gate_up_counts: tuple[int, ...]
    chunk: int                          # MLP rows per unit of the split
    vectors: dict[str, tuple[int, int]]  # norms and biases: where each lies in the broadcast buffer
    vectors_size: int
    wire: str = "float32"               # the type partial sums travel in (see Runtime.sum_flagged)
    vocab_counts: tuple[int, ...] = ()  # LM head rows per rank
    #: pipeline stages, each (ranks, first layer, end layer); empty: tensor-parallel
    stages: tuple[tuple[tuple[int, ...], int, int], ...] = ()


def members(qkv_counts: Sequence[int], gate_up_counts: Sequence[int],
            vocab_counts: Sequence[int], stages: Sequence[Any] = ()) -> list[int]:
    """The ranks that join a decoder's steps: the driver and every rank holding some of it; in
    pipeline stages, every rank of a stage (its stage's collectives need it, even where the
    split left it no rows)."""
    if stages:
        return sorted({0, *(r for s in stages for r in s[0])})
    held = zip(qkv_counts, gate_up_counts, vocab_counts, strict=True)
    return [r for r, counts in enumerate(held) if r == 0 or any(counts)]


@dataclass(frozen=True)
class LlmStep(Header, op="llm_step"):
    model: int
    shape: tuple[int, int]              # the new tokens' embeddings, (tokens, hidden)
    start: int                          # position of the first new token
    all_logits: bool
    vocab_counts: tuple[int, ...]


@dataclass(frozen=True)
class LlmProfile(Header, op="llm_profile"):
    model: int
    enable: bool                        # profile the following decode steps (False: stop)


@dataclass(frozen=True)
class LlmStats(Header, op="llm_stats"):
    model: int


@dataclass(frozen=True)
class LlmMemory(Header, op="llm_memory"):
    dtype: str                          # the weight matrices' type, or
    quant: str | None                   # their quantisation


@dataclass(frozen=True)
class LlmFree(Header, op="llm_free"):
    model: int


def decoder_for(device: Any) -> type:
    """The decoder class a rank runs, by :func:`cmatrix.backends.llm_path`: whole-block ggml
    graphs, torch operations on the rank's device, or numpy activations around the backend's
    matmuls."""
    path = llm_path(device)
    if path == "torch":
        from .torch_decoder import TorchDecoder

        return TorchDecoder
    if path == "ggml":
        from .ggml_decoder import GraphDecoder

        return GraphDecoder
    return RankDecoder


@on_ranks(LlmLoad)
def _llm_load(rt: Runtime, h: LlmLoad, vectors: np.ndarray | None) -> list[str] | None:
    """Build this rank's part of decoder ``h.model`` from its resident weight blocks; the
    driver gets how each rank runs its part."""
    comm, decoder = rt.comm, None
    local_weights.forget()  # every block is in place: close the checkpoint the rank read them from
    with rt.step("prepare"):
        if not comm.is_driver:
            vectors = np.empty(h.vectors_size, dtype=np.float32)
    rt.sync()
    comm.bcast(vectors)
    with rt.step("load"):
        cfg = DecoderConfig(**h.config)
        stages = [Stage(*s) for s in h.stages]
        first, end = next(((s.first, s.end) for s in stages if comm.rank in s.ranks), (0, cfg.num_layers))
        mine = {}
        for name, v in unpack(vectors, h.vectors).items():
            layer = int(name.split(".")[0]) if name[0].isdigit() else None
            if layer is not None and not first <= layer < end:
                continue  # another stage's
            held = _held_by(stages, layer, comm.size)
            for suffix, counts in ((".qkv_bias", h.qkv_counts), (".gate_up_bias", h.gate_up_counts)):
                if name.endswith(suffix):  # the rank's slice among the ranks holding this layer
                    v = v[Plan(0, tuple(c * k for c, k in zip(counts, held, strict=True))).block(comm.rank)]
            mine[name] = v.copy()
        layers = [{part: rt.block(ident) for part, ident in ids.items()} for ids in h.layers[first:end]]
        unit = (cfg.group_size + 2) * cfg.head_dim
        decoder = decoder_for(rt.backend)(cfg, rt.backend, layers, rt.block(h.lm_head), mine,
                                          groups=h.qkv_counts[comm.rank] // unit, chunk=h.chunk, first=first)
        decoder.wire = h.wire
    rt.sync()
    release_free_heap()  # give back the heap the blocks' temporaries took (also the decoder's own)
    # Ranks holding nothing of the decoder stay out of its steps' collectives.
    decoder.members = members(h.qkv_counts, h.gate_up_counts, h.vocab_counts, h.stages)
    if len(decoder.members) < comm.size:
        decoder.group = comm.group(comm.rank in decoder.members)
    else:
        decoder.group = comm
    if stages:
        decoder.pipe = join(comm, stages, decoder.members, mine)
    rt.models[h.model] = decoder  # only once every rank has its part
    kinds = comm.gather_objects(decoder.kind)
    return kinds if comm.is_driver else None


@on_ranks(LlmStep)
def _llm_step(rt: Runtime, h: LlmStep, x: np.ndarray | None) -> np.ndarray | None:
    """Run ``x`` (tokens, hidden) through every layer from position ``start``; return the
    logits of the last token (or of every token) to the driver, followed by one column per
    rank that holds part of the decoder: the seconds it kept the others waiting (see
    :func:`busy_seconds`).

    Only those ranks (and the driver) take part: the others return at once."""
    model = rt.models.get(h.model)
    if model is None:  # no rank has it (llm_load keeps a part only once every rank has one)
        with rt.step("prepare"):
            raise CMatrixError(f"decoder #{h.model} is not loaded on this rank")
        rt.sync()
        return None
    if model.group is None:
        rt.bystander = True
        return None
    with rt.within(model.group):
        if model.pipe is not None:
            return pipeline_step(rt, model, h, x)
        return _step(rt, model, h, x)


def _held_by(stages: list[Stage], layer: int | None, size: int) -> list[int]:
    """Per rank, 1 if it holds part of ``layer`` (None: of every layer, as in tensor parallelism)."""
    if not stages or layer is None:
        return [1] * size
    stage = stage_of(stages, layer)
    return [1 if r in stage.ranks else 0 for r in range(size)]


def _step(rt: Runtime, model: Any, h: LlmStep, x: np.ndarray | None) -> np.ndarray | None:
    comm = rt.comm
    sent = comm.bytes_sent
    with rt.step("prepare"):
        if not comm.is_driver:
            x = np.empty(h.shape, dtype=np.float32)
    rt.sync()
    comm.bcast(x)
    prof = model.profile if h.shape[0] == 1 else None  # decode steps only
    model.timing = prof
    began, held = time.perf_counter(), model.run_delay()
    # held back by the kernel since this rank's previous step ended: between steps, too, the
    # others wait for a rank that is not running when they need it
    before = held - model.held_mark if model.held_mark is not None else 0.0
    with rt.step("attention"):
        model.begin(x, h.start)
    # Each block writes this rank's partial sum into one buffer while the previous block's
    # total (which it reads first) lies in the other; the last value carries the failure flag.
    size = h.shape[0] * h.shape[1]
    buffers = model.sum_buffers(size)
    total, which, waited = None, 0, 0.0
    for i in range(model.cfg.num_layers):
        for kind, block in (("attention", model.attention), ("mlp", model.mlp)):
            buffer, which = buffers[which], 1 - which
            with rt.step(kind):
                block(i, total, buffer[:size].reshape(h.shape))
            t = time.perf_counter()
            rt.sum_flagged(buffer, model.wire)
            waited += time.perf_counter() - t
            total = buffer[:size].reshape(h.shape)
    part = full = None
    with rt.step("logits"):
        logits = model.logits(total, h.all_logits)
        part = np.empty((logits.shape[0], logits.shape[1] + 1), dtype=np.float32)
        part[:, :-1] = logits
        model.held_mark = model.run_delay()
        part[:, -1] = busy_seconds(time.perf_counter() - began, waited, model.held_mark - held, before)
        if comm.is_driver:
            full = np.empty((part.shape[0], model.cfg.vocab_size + comm.size), dtype=np.float32)
    rt.sync()
    comm.gather_blocks(part, full, Plan(1, tuple(h.vocab_counts[r] + 1 for r in model.members)))
    if h.shape[0] == 1:
        model.decode_step_done(time.perf_counter() - began, waited, comm.bytes_sent - sent, prof)
    return full


@on_ranks(LlmProfile)
def _llm_profile(rt: Runtime, h: LlmProfile, _: Any) -> list[dict] | None:
    """Every rank's decode-step profile to the driver; ``h.enable`` turns profiling on or off
    (and starts it afresh)."""
    report = None
    with rt.step("profile"):
        model = rt.models.get(h.model)
        if model is None:
            raise CMatrixError(f"decoder #{h.model} is not loaded on this rank")
        report = None if model.profile is None else {**model.profile.report(), "decoder": model.kind}
        model.set_profile(h.enable)
    rt.sync()
    reports = rt.comm.gather_objects(report)
    return reports if rt.comm.is_driver else None


@on_ranks(LlmStats)
def _llm_stats(rt: Runtime, h: LlmStats, _: Any) -> list[dict] | None:
    """Every rank's running totals to the driver: decode steps, their seconds (and how many of
    them in collectives), bytes moved, and memory used and in all (see :class:`RankCounters`)."""
    report = None
    with rt.step("stats"):
        model = rt.models.get(h.model)
        if model is None:
            raise CMatrixError(f"decoder #{h.model} is not loaded on this rank")
        report = {**model.counters.report(), "memory_used": rt.backend.memory_used(),
                  "memory": rt.backend.memory()}
    rt.sync()
    reports = rt.comm.gather_objects(report)
    return reports if rt.comm.is_driver else None


@on_ranks(LlmMemory)
def _llm_memory(rt: Runtime, h: LlmMemory, _: Any) -> list[dict] | None:
    """Every rank's free memory, its pool and bytes per weight value, for the driver's plan."""
    report = None
    with rt.step("memory"):
        free, pool = rt.backend.memory_free()
        # the ggml graphs of numpy and CPU torch ranks borrow the backend's arrays and blocks
        report = {"free": free, "pool": pool, "per_value": rt.backend.stored_bytes(h.dtype, h.quant),
                  "used": rt.backend.memory_used()}
    rt.sync()
    reports = rt.comm.gather_objects(report)
    return reports if rt.comm.is_driver else None


@on_ranks(LlmFree)
def _llm_free(rt: Runtime, h: LlmFree, _: Any) -> None:
    """Drop this rank's part of a decoder (its weight blocks are freed with their handles)."""
    decoder = None
    with rt.step("free"):
        decoder = rt.models.pop(h.model, None)
    try:
        rt.sync()
    finally:  # the members all reach here, failure or not
        if decoder is not None:
            decoder.leave_group()
