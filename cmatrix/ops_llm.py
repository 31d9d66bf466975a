"""Rank half of the tensor-parallel decoder (driver half: :mod:`cmatrix.llm.model`).

``llm_load`` builds each rank's :class:`~cmatrix.llm.layers.RankDecoder` from weight
blocks already resident (sent by ``shard``) and one broadcast of the small vectors.
``llm_step`` runs every layer for a few new tokens: the embeddings are broadcast
once, each block ends with one Allreduce of a (tokens, hidden) array (which also
carries the ranks' failure flags), and the logits come back by vocabulary slices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CMatrixError
from .llm.config import DecoderConfig
from .llm.layers import RankDecoder
from .llm.layout import unpack
from .plan import Plan
from .runtime import Runtime, command


@command("llm_load")
def llm_load(rt: Runtime, h: dict, vectors: np.ndarray | None) -> None:
    """Build this rank's part of decoder ``h["model"]`` from its resident weight blocks."""
    comm, decoder = rt.comm, None
    with rt.step("prepare"):
        if not comm.is_driver:
            vectors = np.empty(h["vectors_size"], dtype=np.float32)
    rt.sync()
    comm.bcast(vectors)
    with rt.step("load"):
        cfg = DecoderConfig(**h["config"])
        found = unpack(vectors, h["vectors"])
        qkv_plan, gate_up_plan = Plan(0, tuple(h["qkv_counts"])), Plan(0, tuple(h["gate_up_counts"]))
        mine = {}
        for name, v in found.items():
            if name.endswith(".qkv_bias"):
                v = v[qkv_plan.block(comm.rank)]
            elif name.endswith(".gate_up_bias"):
                v = v[gate_up_plan.block(comm.rank)]
            mine[name] = v.copy()
        layers = [{part: rt.block(ident) for part, ident in ids.items()} for ids in h["layers"]]
        unit = (cfg.group_size + 2) * cfg.head_dim
        decoder = RankDecoder(cfg, rt.backend, layers, rt.block(h["lm_head"]), mine,
                              groups=h["qkv_counts"][comm.rank] // unit, chunk=h["chunk"])
    rt.sync()
    rt.models[h["model"]] = decoder  # only once every rank has its part


@command("llm_step")
def llm_step(rt: Runtime, h: dict, x: np.ndarray | None) -> np.ndarray | None:
    """Run ``x`` (tokens, hidden) through every layer from position ``start``; return the
    logits of the last token (or of every token) to the driver."""
    comm = rt.comm
    model = None
    with rt.step("prepare"):
        model = rt.models.get(h["model"])
        if model is None:
            raise CMatrixError(f"decoder #{h['model']} is not loaded on this rank")
        if not comm.is_driver:
            x = np.empty(tuple(h["shape"]), dtype=np.float32)
    rt.sync()
    comm.bcast(x)
    shape = tuple(h["shape"])
    total = None
    for i in range(model.cfg.num_layers):
        partial = None
        with rt.step("attention"):
            if i:
                model.add(x, total, f"{i - 1}.down_bias")
            partial = model.attention(i, x, h["start"])
        total = rt.sum_checked(partial, shape)
        partial = None
        with rt.step("mlp"):
            model.add(x, total, f"{i}.o_bias")
            partial = model.mlp(i, x)
        total = rt.sum_checked(partial, shape)
    part = full = None
    with rt.step("logits"):
        model.add(x, total, f"{model.cfg.num_layers - 1}.down_bias")
        rows = x if h["all_logits"] else x[-1:]
        part = np.ascontiguousarray(model.logits(rows), dtype=np.float32)
        if comm.is_driver:
            full = np.empty((rows.shape[0], model.cfg.vocab_size), dtype=np.float32)
    rt.sync()
    comm.gather_blocks(part, full, Plan(1, tuple(h["vocab_counts"])))
    return full


@command("llm_free")
def llm_free(rt: Runtime, h: dict, _: Any) -> None:
    """Drop this rank's part of a decoder (its weight blocks are freed with their handles)."""
    with rt.step("free"):
        rt.models.pop(h["model"], None)
    rt.sync()
