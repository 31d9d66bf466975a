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
import hashlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.plan import validate_weights
from ..errors import InputError
from . import local_weights as lw
from . import memory_plan
from .checkpoint import Checkpoint, tensor_names
from .commands import LlmFree, LlmProfile, LlmStats, LlmStep
from .config import DecoderConfig
from .gguf_file import GgufCheckpoint, is_gguf
from .layout import check_quant
from .pipeline import decide
from .placing import Placing
from .rebalance import Balancer
from .rebalance import replan as place_again
from .stages import check_mode, stage_fractions

CACHE_MODES = ("save", "load", "auto")
WEIGHT_DTYPES = (None, "float32", "float16", "bfloat16")
WIRE_TYPES = ("float32", "float16", "bfloat16")
MATRICES = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


class DecoderModel(Placing):
    """A decoder whose layers live on the cluster; see :func:`cmatrix.llm.load`."""

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

