"""The decoder's commands, both halves: ``llm_load``, ``llm_step`` and ``llm_free``
(the driver's handle that issues them: :mod:`cmatrix.llm.model`).

``llm_load`` builds each rank's :class:`~cmatrix.llm.layers.RankDecoder` from weight
blocks already resident (sent by ``shard``) and one broadcast of the small vectors.
``llm_step`` runs every layer for a few new tokens: the embeddings are broadcast
once, each block ends with one Allreduce of a (tokens, hidden) array (which also
carries the ranks' failure flags), and the logits come back by vocabulary slices.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.hostmem import release_free_heap
from ..core.plan import Plan
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import CMatrixError
from . import local_weights
from .config import DecoderConfig
from .layers import RankDecoder
from .layout import unpack


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
    """The decoder class a rank runs: whole-block ggml graphs on ggml ranks and, where ggml is
    installed, on numpy and CPU torch ranks too (over their own arrays); torch operations on
    the accelerator of torch GPU ranks; else (OpenCL, or no ggml) numpy activations around the
    backend's matmuls.

    ``CMATRIX_DECODER=numpy`` runs the numpy path on every rank (the reference, for
    debugging); ``CMATRIX_DECODER=torch`` the torch path on CPU torch ranks (slower there:
    torch's per-operation cost).
    """
    choice = os.environ.get("CMATRIX_DECODER", "auto")
    if choice not in ("auto", "numpy", "torch"):
        raise CMatrixError(f"CMATRIX_DECODER: auto, numpy or torch, got {choice!r}")
    if choice == "numpy":
        return RankDecoder
    cpu = device.name == "numpy" or (device.name == "torch" and device.backend.torch_device.type == "cpu")
    if device.name == "torch" and (choice == "torch" or not cpu):
        from .torch_decoder import TorchDecoder

        return TorchDecoder
    if device.name == "ggml" or (cpu and importlib.util.find_spec("ggml") is not None):
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
        found = unpack(vectors, h.vectors)
        qkv_plan, gate_up_plan = Plan(0, h.qkv_counts), Plan(0, h.gate_up_counts)
        mine = {}
        for name, v in found.items():
            if name.endswith(".qkv_bias"):
                v = v[qkv_plan.block(comm.rank)]
            elif name.endswith(".gate_up_bias"):
                v = v[gate_up_plan.block(comm.rank)]
            mine[name] = v.copy()
        layers = [{part: rt.block(ident) for part, ident in ids.items()} for ids in h.layers]
        unit = (cfg.group_size + 2) * cfg.head_dim
        decoder = decoder_for(rt.backend)(cfg, rt.backend, layers, rt.block(h.lm_head), mine,
                                          groups=h.qkv_counts[comm.rank] // unit, chunk=h.chunk)
        decoder.wire = h.wire
    rt.sync()
    release_free_heap()  # give back the heap the blocks' temporaries took (also the decoder's own)
    rt.models[h.model] = decoder  # only once every rank has its part
    kinds = comm.gather_objects(decoder.kind)
    return kinds if comm.is_driver else None


@on_ranks(LlmStep)
def _llm_step(rt: Runtime, h: LlmStep, x: np.ndarray | None) -> np.ndarray | None:
    """Run ``x`` (tokens, hidden) through every layer from position ``start``; return the
    logits of the last token (or of every token) to the driver."""
    comm = rt.comm
    model, sent = None, comm.bytes_sent
    with rt.step("prepare"):
        model = rt.models.get(h.model)
        if model is None:
            raise CMatrixError(f"decoder #{h.model} is not loaded on this rank")
        if not comm.is_driver:
            x = np.empty(h.shape, dtype=np.float32)
    rt.sync()
    comm.bcast(x)
    prof = model.profile if h.shape[0] == 1 else None  # decode steps only
    model.timing = prof
    began = time.perf_counter()
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
        part = np.ascontiguousarray(model.logits(total, h.all_logits), dtype=np.float32)
        if comm.is_driver:
            full = np.empty((part.shape[0], model.cfg.vocab_size), dtype=np.float32)
    rt.sync()
    comm.gather_blocks(part, full, Plan(1, h.vocab_counts))
    if h.shape[0] == 1:
        model.counters.step(time.perf_counter() - began, waited, comm.bytes_sent - sent)
        if prof is not None:
            prof.add("collectives", waited)
            prof.step(time.perf_counter() - began)
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
    with rt.step("free"):
        rt.models.pop(h.model, None)
    rt.sync()
