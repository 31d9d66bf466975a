"""The driver's handle on a tensor-parallel Llama-family decoder.

    import cmatrix as cm
    cl = cm.init()
    model = cm.llm.load(cl, "models/TinyLlama-1.1B-Chat", weights=[0.6, 0.4], quant="q8_0")
    logits = model.forward(token_ids)                 # logits of the last token
    result = model.generate("Why is the sky blue?", max_new_tokens=64)

Every rank holds whole KV groups of each layer's attention (and keeps their
K/V cache), rows of each MLP and rows of the LM head, in proportion to its
share. Embeddings stay on the driver. Per token and layer, only (tokens, hidden)
arrays travel: see :mod:`cmatrix.llm.commands`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core import quant as q
from ..core.arrays import HostArray
from ..core.dtypes import empty, from_float32
from ..core.plan import Plan, validate_weights
from ..core.shares import kind_of
from ..engine import progress
from ..errors import InputError
from . import local_weights as lw
from . import memory_plan
from .checkpoint import Checkpoint, tensor_names
from .commands import LlmFree, LlmLoad, LlmMemory, LlmProfile, LlmStats, LlmStep, members
from .config import DecoderConfig
from .gguf_file import GgufCheckpoint, is_gguf
from .layout import check_quant, fuse_gate_up, fuse_qkv, matrix_splits, mlp_chunk, pack
from .memory_plan import RankMemory
from .pipeline import decide
from .rebalance import Balancer, speed_shares
from .rebalance import replan as place_again
from .stages import check_mode, layer_weights, stage_fractions

CACHE_MODES = ("save", "load", "auto")
WEIGHT_DTYPES = (None, "float32", "float16", "bfloat16")
WIRE_TYPES = ("float32", "float16", "bfloat16")
MATRICES = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


class DecoderModel:
    """A decoder whose layers live on the cluster; see :func:`cmatrix.llm.load`."""

    _bar: Any = progress.NoBar()  # the load's progress bar, while it loads

    def __init__(self, cluster: Any, path: str | os.PathLike, weights: Sequence[float] | str | None = None,
                 quant: str | None = None, cache: str | None = None, name: str | None = None,
                 dtype: str | None = None, wire: str = "float32", local_weights: str = "auto",
                 rebalance: bool | None = None, parallel: str = "auto") -> None:
        self.cluster, self.path = cluster, Path(path)
        check_mode(parallel)
        gguf = gguf_checkpoint(self.path)
        self.config = cfg = gguf.config if gguf else DecoderConfig.from_dir(self.path)
        #: what was converted on the way in (a GGUF file's K-quants...), or None
        self.conversion_note: str | None = None
        if gguf:
            dtype, quant, self.conversion_note = gguf.default_types(dtype, quant)
        check_quant(cfg, quant)
        if dtype not in WEIGHT_DTYPES:
            raise InputError(f"dtype: one of {', '.join(map(repr, WEIGHT_DTYPES))}, got {dtype!r}")
        if dtype not in (None, "float32") and quant is not None:
            raise InputError(f"give dtype ({dtype!r}) or quant ({quant!r}), not both: quantised blocks "
                             "have their own type")
        self.dtype = dtype or "float32"
        if wire not in WIRE_TYPES:
            raise InputError(f"wire: one of {', '.join(map(repr, WIRE_TYPES))}, got {wire!r}")
        self.wire = wire
        if rebalance not in (None, True, False):
            raise InputError(f"rebalance: True, False or None (on with measured shares), got {rebalance!r}")
        if local_weights not in lw.MODES:
            raise InputError(f"local_weights: one of {', '.join(map(repr, lw.MODES))}, got {local_weights!r}")
        if local_weights == "on" and cache is not None:
            raise InputError("local_weights='on' reads the checkpoint on every rank; cache= reads each "
                             "rank's saved blocks instead: give one of them")
        if cache is not None and cache not in CACHE_MODES:
            raise InputError(f"cache: one of {', '.join(map(repr, CACHE_MODES))} or None, got {cache!r}")
        #: shares from the ranks' measured decode speed (``weights="auto"``, or none given to a
        #: cluster started with ``init(weights="auto")``), capped by their memory
        self.auto_weights = (isinstance(weights, str) and weights == "auto") or \
            (weights is None and cluster.driver.auto_weights)
        #: per rank, the measured decode speed its share came from (GB/s), when auto
        self.speeds: list[float] | None = None
        self.weights = cluster.weights if weights is None or self.auto_weights \
            else validate_weights(weights, cluster.size)
        self.quant, self.cache = quant, cache
        self.name = name or _default_name(self.path)
        self.checkpoint = gguf or Checkpoint(self.path)
        self._names = tensor_names(cfg, self.checkpoint)
        # Check everything that will be read before any data moves (with cache="load" the
        # matrices come from the ranks' disks: only embeddings, norms and biases are read).
        for key, (tensor, shape) in self._names.items():
            if cache != "load" or key.rsplit(".", 1)[-1] not in MATRICES:
                self.checkpoint.check(tensor, shape)
        self._check_memory()
        #: pipeline stages (None: tensor-parallel over every rank), and which and why, in words
        self.stages, self.layout_note = decide(self, parallel)
        if self.stages:
            rebalance = False  # re-plans re-split a tensor-parallel model
            # what each rank holds in stages, as the share of every layer it would match
            memory_plan.check(self.config, stage_fractions(self.stages, self.weights, cfg.num_layers),
                              self.quant, self.dtype, self.memory_ranks)
        #: per rank: None if it read its weight blocks from its own copy of the checkpoint, else why not
        self.local_problems: list[str | None] = ["cache= was given"] * cluster.size
        if cache is None:  # with a cache, blocks come from the ranks' cache files or the driver
            self.local_problems = lw.check_ranks(cluster.driver, cluster.ranks, self.path, local_weights)
        self.embeddings = self.checkpoint.get(*self._names["embed"])
        self.position = 0
        #: the token ids the ranks' K/V caches hold, positions 0..position-1
        self.cached_ids: list[int] = []
        self._tokenizer = None
        self._matrices: list[Any] = []
        self._local_blocks: list[int] = []  # ids of blocks placed by llm_shard_local
        self._file_vocabulary = False  # a GGUF file that holds its tokenizer
        self._id = None
        #: per-rank compute times of the decode steps, and the re-plans they called for
        self.balancer = Balancer(self, self.auto_weights if rebalance is None else rebalance)
        began = time.perf_counter()
        try:
            self._load()
            self.balancer.cost = time.perf_counter() - began
        except BaseException:
            self.abandon()  # blocks already placed: freed with the next command
            raise
        if gguf is not None:  # the file stays mapped while open: close it (the tokenizer reopens it)
            self._file_vocabulary = gguf.has_vocabulary()
            gguf.close()

    # ---- loading ------------------------------------------------------------------

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
        sizes = {part: rows * cols for part, ((rows, cols), _, _) in matrix_splits(cfg, self.quant).items()}
        matrices = cfg.num_layers * (sum(sizes.values()) - sizes["lm_head"]) + sizes["lm_head"]
        total = int(matrices * self.stored_bytes_per_value())  # one bar: bytes as the ranks store them
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

    # ---- running ------------------------------------------------------------------

    def forward(self, token_ids: Sequence[int], start: int | None = None,
                all_logits: bool = False) -> np.ndarray:
        """Run new tokens from position ``start`` (default: after the last call's tokens;
        0 starts a new sequence) and return float32 logits: (vocab,) of the last token, or
        (tokens, vocab) with ``all_logits``. Each rank extends its K/V cache."""
        cfg = self.config
        ids = np.asarray(token_ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"token_ids: integer token ids, got {ids.dtype} values")
        start = self.position if start is None else start
        if ids.size == 0:
            raise InputError("token_ids: empty")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise InputError(f"token_ids: ids must lie in [0, {cfg.vocab_size}), "
                             f"got {ids.min()}..{ids.max()}")
        if isinstance(start, bool) or not isinstance(start, int | np.integer) \
                or not 0 <= start <= self.position:
            raise InputError(f"start: an integer in [0, {self.position}] (the cached positions), "
                             f"got {start!r}")
        if start + ids.size > cfg.max_positions:
            raise InputError(f"{start + ids.size} positions exceed max_position_embeddings "
                             f"{cfg.max_positions}")
        if self._id is None:
            raise InputError("this model was closed")
        x = np.ascontiguousarray(self.embeddings[ids.astype(np.int64)])
        self.position = start  # until the step succeeds, the ranks' caches end here at most
        del self.cached_ids[start:]
        full = self.cluster.driver.run(LlmStep(self._id, x.shape, int(start), bool(all_logits),
                                               tuple(self._vocab_counts)), x)
        self.position = start + ids.size
        self.cached_ids.extend(int(t) for t in ids)
        # each member's block of columns ends with the seconds it computed
        ends = np.cumsum([self._vocab_counts[r] + 1 for r in self.members]) - 1
        seconds = [0.0] * self.cluster.size
        for r, end in zip(self.members, ends, strict=True):
            seconds[r] = float(full[0, end])
        self.balancer.observe(seconds, ids.size)
        logits = np.delete(full, ends, axis=1)
        return logits if all_logits else logits[0]

    def profile(self, enable: bool) -> list[dict]:
        """Start (``True``) or stop timing decode steps on every rank; returns each rank's
        profile since it was last started (see :mod:`cmatrix.llm.rank_part`), with its host
        and backend."""
        if self._id is None:
            raise InputError("this model was closed")
        reports = self.cluster.driver.run(LlmProfile(self._id, bool(enable)))
        return [{"rank": r, "host": info.host, "backend": info.backend, **(rep or {"steps": 0})}
                for r, (info, rep) in enumerate(zip(self.cluster.ranks, reports, strict=True))]

    def rank_stats(self) -> list[dict]:
        """Per rank: host, backend, device, share, the type its weights are held in (see
        :meth:`stored_types`), memory used and in all (bytes), and running
        totals of its decode steps (``steps``, ``seconds``, ``collective_seconds``: the part
        spent in collectives, waiting for the others included, and ``bytes_sent``: what it put into
        the collectives)."""
        if self._id is None:
            raise InputError("this model was closed")
        reports = self.cluster.driver.run(LlmStats(self._id))
        return [{"rank": r, "host": info.host, "backend": info.backend, "device": info.device,
                 "share": info.weight if self.weights is None else float(self.weights[r]),
                 "weights": held, **rep}
                for r, (info, rep, held) in enumerate(zip(self.cluster.ranks, reports, self.stored_types(),
                                                          strict=True))]

    def layout(self) -> list[dict]:
        """Per rank: the layers it holds part of (first, end), and in each its KV groups (query
        heads) and MLP rows; and its rows of the LM head."""
        cfg = self.config
        unit = (cfg.group_size + 2) * cfg.head_dim
        ranges = {r: (s.first, s.end) for s in self.stages or () for r in s.ranks}
        return [{"rank": r, "layers": ranges.get(r, (0, cfg.num_layers) if rows or g else (0, 0)),
                 "kv_groups": rows // unit, "heads": rows // unit * cfg.group_size,
                 "mlp_rows": g // 2, "vocab_rows": v}
                for r, (rows, g, v) in enumerate(zip(self._qkv_counts, self._gate_up_counts,
                                                  self._vocab_counts, strict=True))]

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (the folder's tokenizer.json, or a GGUF file's vocabulary), read on
        first use."""
        if self._tokenizer is None:
            self._tokenizer = read_tokenizer(self.path)
        return self._tokenizer

    def stop_ids(self) -> set[int]:
        """End-of-sequence ids: the tokenizer's when it has one, else config.json's."""
        if (self.path / "tokenizer.json").exists() or self._file_vocabulary:
            return set(self.tokenizer.eos_ids)
        eos = self.config.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def generate(self, prompt: Any = None, **options: Any) -> Any:
        """Generate text; see :func:`cmatrix.llm.generate.generate` for the options."""
        from .generate import generate

        return generate(self, prompt, **options)

    def close(self) -> None:
        """Free the decoder's blocks and caches on every rank."""
        if self._id is not None and not self.cluster.closed:
            self.release_parts()
        self._id, self._matrices, self._local_blocks = None, [], []

    def replan(self, weights: Sequence[float]) -> float:
        """Place the model again split by ``weights`` (what rebalancing does between tokens, see
        :mod:`cmatrix.llm.rebalance`); the K/V cache moves with its heads, so generation goes
        on where it was. Returns the seconds it took. On failure the model is closed."""
        if self._id is None:
            raise InputError("this model was closed")
        if self.stages:
            raise InputError("replan re-splits a tensor-parallel model; this one runs in pipeline stages "
                             "(load it with parallel='tp' to re-plan)")
        weights = validate_weights(weights, self.cluster.size)
        memory_plan.check(self.config, weights, self.quant, self.dtype, self.memory_ranks)
        return place_again(self, weights)

    @contextlib.contextmanager
    def checkpoint_open(self) -> Iterator[None]:
        """The checkpoint readable for a new placement (a GGUF file is closed after loading: it is
        opened again for the while), and each rank's own copy checked once if ``cache=`` had
        made that unnecessary."""
        if self.local_problems == ["cache= was given"] * self.cluster.size:
            self.local_problems = lw.check_ranks(self.cluster.driver, self.cluster.ranks, self.path, "auto")
        if not isinstance(self.checkpoint, GgufCheckpoint):
            yield
            return
        self.checkpoint = GgufCheckpoint(self.path)
        try:
            yield
        finally:
            self.checkpoint.close()

    def abandon(self) -> None:
        """After a failed (re-)placement: free whatever was placed, and close the model."""
        if self._id is not None:
            self._finalizer.detach()
        for ident in [*self._local_blocks, *([self._id] if self._id is not None else [])]:
            self.cluster.driver.free_later(ident)
        self._id, self._matrices, self._local_blocks = None, [], []
        self.position, self.cached_ids = 0, []

    def release_parts(self) -> None:
        """Free every rank's part (blocks, K/V cache); :meth:`_load` places them again (see
        :func:`cmatrix.llm.rebalance.replan`), from the checkpoint."""
        self._finalizer.detach()
        for ident in self._local_blocks:  # freed with the next command
            self.cluster.driver.free_later(ident)
        self.cluster.driver.run(LlmFree(self._id))
        for m in self._matrices:
            self.cluster.free(m)
        self._id, self._matrices, self._local_blocks = None, [], []
        self.cache = None


def _free_later(driver: Any, idents: list[int]) -> None:
    for ident in idents:
        driver.free_later(ident)


def gguf_checkpoint(path: Path) -> GgufCheckpoint | None:
    """The GGUF file at ``path``; None for a folder; refuses any other file."""
    if is_gguf(path):
        return GgufCheckpoint(path)
    if path.is_file():
        raise InputError(f"{path}: a file, but not a GGUF file; the model is a Hugging Face folder "
                         "(config.json, *.safetensors) or a .gguf file")
    if path.suffix.lower() == ".gguf":
        raise InputError(f"{path}: no such file")
    return None


def read_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model folder (tokenizer.json) or of a ``.gguf`` file."""
    if is_gguf(path):
        return GgufCheckpoint(path).tokenizer()
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def _default_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name)[:60].strip(".") or "model"
    return f"llm.{stem}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"


def load(cluster: Any, path: str | os.PathLike, weights: Sequence[float] | str | None = None,
         quant: str | None = None, cache: str | None = None, name: str | None = None,
         dtype: str | None = None, wire: str = "float32", local_weights: str = "auto",
         rebalance: bool | None = None, parallel: str = "auto") -> DecoderModel:
    """Load a Llama-family checkpoint (a local Hugging Face folder or a ``.gguf`` file) onto the
    cluster.

    ``weights``: per-rank shares (default the cluster's), or "auto": proportional to each
    rank's measured decode speed for these weights' type (see ``cmatrix bench``), capped by
    its memory (the default on a cluster started with ``init(weights="auto")``); attention
    is split in whole KV groups, so a rank may hold no heads. ``quant``: "q8_0"/"q4_0" for every weight
    matrix (ggml ranks keep the blocks). ``cache``: "save" also writes each rank's
    shards to its node's disk, "load" reads them from there (the driver reads only
    embeddings, norms and biases), "auto" reuses what is unchanged. ``name``: the
    cache prefix (default: from the folder's name and path). ``dtype``: "float16" or
    "bfloat16" keeps the weight matrices 16-bit on the ranks (ggml ranks multiply them as
    they are; default float32); norms, biases and activations stay float32. ``wire``:
    "float16" or "bfloat16" sends each block's partial sums in that type (half the bytes
    per token, for slow links; the sums are still taken in float32); default "float32",
    exact. ``local_weights``: "auto" (default) lets every rank whose host has the checkpoint at
    the same path, with the same files, read its own blocks (the driver sends the others
    theirs); "on" requires every rank to; "off" has the driver read and send every rank's
    blocks. A GGUF file's matrices keep their stored type when neither ``dtype`` nor ``quant``
    is given (F16/BF16/Q8_0/Q4_0; other block types become q8_0 or q4_0, and
    ``model.conversion_note`` says so). ``rebalance``: while generating, move work away from
    a rank that stays slower than its share predicts (see :mod:`cmatrix.llm.rebalance`);
    default on with measured shares ("auto"), off with shares given (and in pipeline stages).
    ``parallel``: "tp" splits every layer across every rank (two sums per layer per token);
    "pp" gives each host a contiguous range of layers (split among its ranks), so a token
    crosses each link once; "auto" (default) measures the links and the ranks' speed and
    picks the faster (always "tp" on one host). ``model.layout_note`` says what was chosen.
    """
    return DecoderModel(cluster, path, weights=weights, quant=quant, cache=cache, name=name, dtype=dtype,
                        wire=wire, local_weights=local_weights, rebalance=rebalance, parallel=parallel)

