"""Placing a decoder's weights on the ranks: the loading half of
:class:`~cmatrix.llm.model.DecoderModel`, as a mixin.

It uses the model's ``cluster``, ``config``, ``checkpoint``, ``path``, ``name``,
``weights``, ``stages``, ``dtype``, ``quant``, ``cache``, ``local_problems`` and
``_names``, and sets the placed blocks' ids, the per-rank row counts, ``members`` and
``decoders``.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core import quant as q
from ..core.arrays import HostArray
from ..core.dtypes import empty, from_float32
from ..core.plan import Plan
from ..core.shares import kind_of
from ..engine import progress
from ..errors import InputError
from . import local_weights as lw
from . import memory_plan
from .commands import LlmLoad, LlmMemory, members
from .layout import fuse_gate_up, fuse_qkv, matrix_splits, matrix_values, mlp_chunk, pack
from .memory_plan import RankMemory
from .rebalance import speed_shares
from .stages import layer_weights


class Placing:
    """Reading the checkpoint and placing every weight matrix on the ranks (see the module doc)."""

    _bar: Any = progress.NoBar()  # the load's progress bar, while it loads

    def _read(self, key: str) -> np.ndarray | None:
        tensor, shape = self._names[key]
        return None if tensor is None else self.checkpoint.get(tensor, shape)

    def _shard(self, build, suffix: str, shape: tuple[int, int], align: int, axis: int = 0,
               part: str = "", layer: int = -1) -> Any:
        """One weight matrix onto the ranks: without a cache as :meth:`_shard_local` places it;
        with one through the cache (``build()`` makes the matrix; not called for cache='load')."""
        if self.cache is None:
            return self._shard_local(suffix, shape, align, axis, part, layer)
        w = None if self.cache == "load" else build()
        if w is not None and self.quant is None and self.dtype != "float32":
            w = HostArray(from_float32(w, self.dtype), self.dtype, "numpy")
        m = self.cluster.shard(w, name=f"{self.name}.{suffix}", weights=self._weights_for(layer), axis=axis,
                               quant=self.quant, quant_axis=1, cache=self.cache, align=align)
        self._matrices.append(m)
        self._bar.update(int(shape[0] * shape[1] * self.stored_bytes_per_value()))
        dtype = "float32" if self.quant else self.dtype
        if tuple(m.shape) != shape or m.quant != self.quant or m.axis != axis or m.dtype != dtype:
            raise InputError(f"the cached {m.name} is {m.quant or m.dtype} {tuple(m.shape)} split along "
                             f"axis {m.axis}; {self.path} with quant={self.quant!r} needs "
                             f"{self.quant or dtype} {shape} along axis {axis}: load it with cache='save' "
                             "or 'auto' once")
        return m

    @property
    def local_ranks(self) -> tuple[bool, ...]:
        """Per rank: whether it read its weight blocks from its own copy of the checkpoint."""
        return tuple(p is None for p in self.local_problems)

    def _shard_local(self, suffix: str, shape: tuple[int, int], align: int, axis: int, part: str,
                     layer: int) -> Any:
        """One weight matrix onto the ranks (see :meth:`_shard_local_many`)."""
        return self._shard_local_many([(suffix, shape, align, axis, part, layer)])[0]

    def _shard_local_many(self, specs: list[tuple[str, tuple[int, int], int, int, str, int]]) -> list[Any]:
        """Weight matrices, each ``(suffix, shape, align, axis, part, layer)``, onto the ranks:
        those with their own copy of the checkpoint read their blocks; the driver reads the
        others' blocks alone and sends them. When every rank reads its own, one command places
        them all (a rank the kernel holds back answers fewer commands late)."""
        dtype = "float32" if self.quant else self.dtype
        plans = []
        for _, shape, align, axis, _, layer in specs:
            if self.quant and axis == 1:  # every rank holds whole blocks (as Cluster.shard aligns them)
                align = math.lcm(align, q.BLOCK)
            plans.append(Plan.from_weights(shape[axis], self._weights_for(layer), axis, align))
        matrices = [(part, layer, shape, plan, f"{self.name}.{suffix}")
                    for (suffix, shape, _, _, part, layer), plan in zip(specs, plans, strict=True)]
        d, path, cfg, local = self.cluster.driver, self.path, self.config, self.local_ranks
        if all(local):
            placed = lw.shard_local(d, path, cfg, self._chunk, dtype, self.quant, local, matrices)
        else:  # one at a time: the driver holds each matrix it sends
            placed = [lw.shard_local(d, path, cfg, self._chunk, dtype, self.quant, local, [m],
                                     lambda _, m=m: self._sent(*m[:4], dtype))[0] for m in matrices]
        for m in placed:
            self._local_blocks.append(m.id)
            self._bar.update(int(m.shape[0] * m.shape[1] * self.stored_bytes_per_value()))
        return placed

    def _sent(self, part: str, layer: int, shape: tuple[int, int], plan: Plan, dtype: str) -> np.ndarray:
        """A matrix whole, in ``dtype``, holding the blocks of the ranks without their own copy.
        The pages of blocks the ranks read themselves are never touched: the driver's memory
        holds only what it sends."""
        full = empty(shape, dtype)
        for r, local in enumerate(self.local_ranks):
            lo, hi = plan.displs[r], plan.displs[r] + plan.counts[r]
            if local or lo == hi:
                continue
            block = lw.read_block(self.checkpoint, self.config, part, layer, self._chunk, lo, hi)
            block = block if dtype == "float32" else from_float32(block, dtype)
            if plan.axis == 0:
                full[lo:hi] = block
            else:
                full[:, lo:hi] = block
        return full

    def _check_memory(self) -> None:
        """Refuse, before anything is read or sent, a split that does not fit some rank's memory.
        ``memory_before`` keeps what each rank reported (free, used, bytes per value)."""
        self.memory_before = reports = self.cluster.driver.run(LlmMemory(self.dtype, self.quant))
        #: what each rank could hold when the model was loaded (for re-plans)
        self.memory_ranks = ranks = [
            RankMemory(r, info.host, info.backend, rep["free"], rep["pool"], rep["per_value"])
            for r, (info, rep) in enumerate(zip(self.cluster.ranks, reports, strict=True))]
        if self.auto_weights:
            target, self.speeds = speed_shares(self.cluster, kind_of(self.dtype, self.quant))
            self.weights = np.asarray(memory_plan.fitted(self.config, target, self.quant, ranks)
                                      or target)  # none fit: check() says so
        memory_plan.check(self.config, self.weights, self.quant, self.dtype, ranks)

    def stored_types(self) -> list[str]:
        """Per rank, the type its weight matrices are held in: ``"float16"``, ``"q4_0"``, or
        ``"float32 (widened from bfloat16)"`` where its backend widens (numpy; quantised
        weights on a GPU torch rank)."""
        kind = self.quant or self.dtype
        kept = q.BLOCK_BYTES[self.quant] / q.BLOCK if self.quant else 4.0 if self.dtype == "float32" else 2.0
        return [kind if rep["per_value"] <= kept else f"float32 (widened from {kind})"
                for rep in self.memory_before]

    def _weights_for(self, layer: int) -> Sequence[float]:
        """Per rank, its share of ``layer`` (-1: of the LM head): zero outside the stage holding it."""
        if not self.stages:
            return self.weights
        return layer_weights(self.stages, self.weights, None if layer < 0 else layer)

    def stored_bytes_per_value(self) -> float:
        """Bytes per weight as the ranks store it (quantised blocks: with their scales)."""
        if self.quant:
            return q.BLOCK_BYTES[self.quant] / q.BLOCK
        return 4.0 if self.dtype == "float32" else 2.0

    def _load(self) -> None:
        cfg, cl = self.config, self.cluster
        self._chunk = chunk = mlp_chunk(cfg, self.quant)
        layers, vectors = [], {}
        self._qkv_counts = self._gate_up_counts = [0] * cl.size
        # one bar: bytes as the ranks store them
        total = int(matrix_values(cfg, self.quant) * self.stored_bytes_per_value())
        with progress.bar(total, f"loading {self.path.name}") as self._bar:
            for i in range(cfg.num_layers):
                layers.append(self._load_layer(i, chunk, vectors))
            head = self._shard(lambda: self._read("lm_head"), "lm_head", (cfg.vocab_size, cfg.hidden_size),
                               align=1, part="lm_head")
        self._bar = progress.NoBar()
        self._vocab_counts = list(head.counts)
        vectors["final_norm"] = self._read("final_norm")
        buffer, where = pack(vectors)
        d = cl.driver
        self._id = d.new_id()
        # A model dropped without close() is freed on the ranks with the next command.
        self._finalizer = weakref.finalize(self, _free_later, d, [self._id, *self._local_blocks])
        #: how each rank runs its part ("ggml graphs", "ggml on numpy", "torch cuda", "numpy+opencl")
        self.decoders: list[str] = d.run(LlmLoad(
            self._id, dataclasses.asdict(cfg), tuple(layers), head.id, tuple(self._qkv_counts),
            tuple(self._gate_up_counts), chunk, where, buffer.size, self.wire,
            tuple(self._vocab_counts), tuple((s.ranks, s.first, s.end) for s in self.stages or ())), buffer)
        #: the ranks that run its steps: the driver and those holding some of it
        self.members = members(self._qkv_counts, self._gate_up_counts, self._vocab_counts,
                               tuple((s.ranks, s.first, s.end) for s in self.stages or ()))

    def _load_layer(self, i: int, chunk: int, vectors: dict[str, np.ndarray]) -> dict[str, int]:
        """Shard layer ``i``'s four matrices; add its norms and biases to ``vectors``."""
        cfg = self.config
        width = cfg.group_size * cfg.head_dim

        def r(part: str) -> np.ndarray | None:
            return self._read(f"{i}.{part}")

        def shard(build, part: str) -> Any:
            shape, axis, align = splits[part]
            return self._shard(build, f"layers.{i}.{part}", shape, align=align, axis=axis, part=part, layer=i)

        splits = matrix_splits(cfg, self.quant)
        if self.cache is None:  # the four in one command where every rank reads its own
            qkv, o, gate_up, down = self._shard_local_many([
                (f"layers.{i}.{part}", splits[part][0], splits[part][2], splits[part][1], part, i)
                for part in ("qkv", "o", "gate_up", "down")])
        else:
            qkv = shard(lambda: fuse_qkv(r("q"), r("k"), r("v"), cfg), "qkv")
            o = shard(lambda: r("o"), "o")
            gate_up = shard(lambda: fuse_gate_up(r("gate"), r("up"), chunk), "gate_up")
            down = shard(lambda: r("down"), "down")
        if [c // ((cfg.group_size + 2) * cfg.head_dim) for c in qkv.counts] != [c // width for c in o.counts]:
            raise InputError("internal: q/k/v and o_proj were split differently")
        # a rank's counts in its own layers (in pipeline stages, other layers' are zero)
        self._qkv_counts = [max(a, b) for a, b in zip(self._qkv_counts, qkv.counts, strict=True)]
        self._gate_up_counts = [max(a, b) for a, b in zip(self._gate_up_counts, gate_up.counts, strict=True)]
        vectors[f"{i}.attn_norm"] = r("attn_norm")
        vectors[f"{i}.mlp_norm"] = r("mlp_norm")
        if cfg.qkv_bias:
            vectors[f"{i}.qkv_bias"] = fuse_qkv(r("q_bias"), r("k_bias"), r("v_bias"), cfg)
        if cfg.mlp_bias:
            vectors[f"{i}.gate_up_bias"] = fuse_gate_up(r("gate_bias"), r("up_bias"), chunk)
            vectors[f"{i}.down_bias"] = r("down_bias")
        if cfg.o_bias:
            vectors[f"{i}.o_bias"] = r("o_bias")
        return {"qkv": qkv.id, "o": o.id, "gate_up": gate_up.id, "down": down.id}


def _free_later(driver: Any, idents: list[int]) -> None:
    for ident in idents:
        driver.free_later(ident)
