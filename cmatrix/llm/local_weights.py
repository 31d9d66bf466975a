"""Ranks that read their part of the weights from their own copy of the checkpoint.

A rank whose host has the model at the same absolute path as the driver (a shared folder,
or a copy) and whose copy matches the driver's (:func:`fingerprint`: every file's size, its
and sha256) reads the rows or columns of each weight matrix it
holds itself (rows of row-split matrices are read alone; column-split ones are read a band
of rows at a time): the driver sends it nothing, so weights need not cross the driver's
network link. The driver reads a matrix only when some rank has no such copy, and
sends that rank its block as ``shard`` would. Both halves of both commands are here:

- ``llm_local_check``: which ranks have a matching copy (with the reason where one has not);
- ``llm_shard_local``: one weight matrix of the decoder onto the ranks, each rank with a
  copy building its block from the file (:func:`read_block`), the others receiving theirs.

Blocks are the same values the driver would send: the same fused layout (:mod:`.layout`),
the same conversion to the stored type, then the backend's own upload (and quantisation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.dtypes import empty, from_float32
from ..core.plan import Plan
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import CMatrixError, InputError
from ..io import shardfiles
from ..io.atomic import atomic_path
from .checkpoint import Checkpoint, tensor_names
from .config import DecoderConfig
from .layout import fuse_gate_up, fuse_qkv

MODES = ("auto", "on", "off")
#: remembered sha256 of checkpoint files, by path, size, modification time and inode
DIGESTS_FILE = "file-digests.json"
CHUNK = 8 << 20


def fingerprint(path: str | os.PathLike) -> str:
    """The identity of a checkpoint (a ``.gguf`` file, or a folder's ``*.safetensors`` and
    index): names, sizes and the sha256 of every byte. A file's digest is remembered in the
    cache folder (:func:`cmatrix.io.shardfiles.cache_dir`) while its size, modification time
    and inode stay the same, so only the first load of a model reads it whole."""
    p = Path(path)
    files = [p] if p.is_file() else \
        sorted([*p.glob("*.safetensors"), *p.glob("model.safetensors.index.json")])
    if not files:
        raise FileNotFoundError(f"{p}: no checkpoint files")
    known = _read_digests()
    digest, changed = hashlib.sha256(), False
    for file in files:
        st = file.stat()
        key, stamp = str(file.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = known.get(key)
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp
                and isinstance(entry.get("sha256"), str)):
            entry = known[key] = {"stamp": stamp, "sha256": _sha256(file)}
            changed = True
        digest.update(f"{file.name}\0{st.st_size}\0{entry['sha256']}\0".encode())
    if changed:
        _write_digests(known)
    return digest.hexdigest()


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_digests() -> dict:
    try:
        data = json.loads((shardfiles.cache_dir() / DIGESTS_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_digests(known: dict) -> None:
    known = {path: entry for path, entry in known.items() if Path(path).exists()}  # forget deleted files
    try:  # a cache only: a read-only cache folder costs a re-read next time, nothing more
        with atomic_path(shardfiles.cache_dir() / DIGESTS_FILE) as tmp:
            tmp.write_text(json.dumps(known))
    except OSError:
        pass


def open_checkpoint(path: str | os.PathLike) -> Any:
    """The checkpoint at ``path``: a GGUF file or a Hugging Face folder."""
    from .gguf_file import GgufCheckpoint, is_gguf

    return GgufCheckpoint(path) if is_gguf(path) else Checkpoint(path)


@dataclass(frozen=True)
class LocalBlock:
    """The driver's record of one weight matrix the ranks hold (what ``shard`` returns, less
    the methods: the decoder frees its blocks itself)."""

    id: int
    shape: tuple[int, int]
    axis: int
    counts: tuple[int, ...]
    quant: str | None
    dtype: str
    name: str


@dataclass(frozen=True)
class LlmLocalCheck(Header, op="llm_local_check"):
    path: str
    fingerprint: str


@dataclass(frozen=True)
class LlmShardLocal(Header, op="llm_shard_local"):
    ids: tuple[int, ...]         # one per matrix
    path: str
    config: dict                 # DecoderConfig's fields
    chunk: int                   # MLP rows per unit of the split
    dtype: str                   # the blocks' type before upload: float32 (also for quant) or 16-bit
    quant: str | None
    local: tuple[bool, ...]      # per rank: it reads its blocks from its own copy
    # per matrix: (part: "qkv", "o", "gate_up", "down" or "lm_head", layer, shape, axis, counts, name)
    matrices: tuple[tuple, ...]

    def created(self) -> list[int]:
        return list(self.ids)


# ---- driver halves ------------------------------------------------------------------------

def check_ranks(driver: Any, ranks: list[Any], path: Path, mode: str) -> list[str | None]:
    """Per rank: None if it reads its blocks itself, else why not. ``mode`` "off": only the
    driver (rank 0, which opened the checkpoint) does; "auto": every rank with a matching copy;
    "on": every rank, or an :class:`InputError` naming each that cannot."""
    if mode not in MODES:
        raise InputError(f"local_weights: one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "off" or len(ranks) == 1:  # the driver reads its own blocks from the file it opened
        return [None] + ["local_weights='off'"] * (len(ranks) - 1)
    statuses = driver.run(LlmLocalCheck(str(path.resolve()), fingerprint(path)))
    missing = [s for s in statuses if not s["ok"]]
    if mode == "on" and missing:
        lines = [f"local_weights='on': {len(missing)} of {len(statuses)} ranks cannot read {path.resolve()}:"]
        lines += [f"  rank {s['rank']} on host {s['host']} ({ranks[s['rank']].backend}): {s['problem']}"
                  for s in missing]
        lines.append("Copy the model to the same path on those hosts (or share the folder), or use "
                     "local_weights='auto' to send them their blocks.")
        raise InputError("\n".join(lines))
    return [None if s["ok"] else f"{s['host']}: {s['problem']}" for s in statuses]


def shard_local(driver: Any, path: Path, cfg: DecoderConfig, chunk: int, dtype: str, quant: str | None,
                local: tuple[bool, ...], matrices: list[tuple[str, int, tuple[int, int], Plan, str]],
                build: Any = None) -> list[LocalBlock]:
    """Weight matrices onto the ranks, in one command: ``matrices`` lists each one's (part,
    layer, shape, plan, name). Ranks marked ``local`` read their blocks themselves, one at a
    time; ``build(i)`` (matrix i whole, already in ``dtype``) is called only when some rank is
    not (give one matrix at a time then: the driver holds every one it sends)."""
    if quant is None:
        for *_, plan, _ in matrices:
            driver.check_dtype(dtype, plan.counts)
    payload = None if all(local) else [np.ascontiguousarray(build(i)) for i in range(len(matrices))]
    ids = tuple(driver.new_id() for _ in matrices)
    described = tuple((part, layer, shape, plan.axis, plan.counts, name)
                      for part, layer, shape, plan, name in matrices)
    driver.run(LlmShardLocal(ids, str(path.resolve()), dataclasses.asdict(cfg), chunk, dtype, quant, local,
                             described), payload)
    return [LocalBlock(ident, shape, plan.axis, plan.counts, quant, "float32" if quant else dtype, name)
            for ident, (_, _, shape, plan, name) in zip(ids, matrices, strict=True)]


# ---- rank halves --------------------------------------------------------------------------

_OPEN: dict[str, Any] = {}  # the checkpoint a rank reads, kept open from the check to the last block


def forget() -> None:
    """Close the checkpoint a rank read its blocks from (a GGUF file stays mapped while open)."""
    _OPEN.clear()


@on_ranks(LlmLocalCheck)
def _local_check(rt: Runtime, h: LlmLocalCheck, _: Any) -> list[dict] | None:
    """Whether this rank has a copy of ``h.path`` matching the driver's; never raises."""
    status = {"rank": rt.comm.rank, "host": rt.comm.host, "ok": False, "problem": None}
    with rt.step("check"):
        _OPEN.clear()
        try:
            if not Path(h.path).exists():
                status["problem"] = f"{h.path} does not exist on this host"
            elif fingerprint(h.path) != h.fingerprint:
                status["problem"] = f"{h.path} differs from the driver's copy (file sizes or sha256)"
            else:
                _OPEN[h.path] = open_checkpoint(h.path)
                status["ok"] = True
        except Exception as exc:  # noqa: BLE001 - any unreadable copy means: send this rank its blocks
            status["problem"] = f"{h.path} cannot be read here: {type(exc).__name__}: {exc}"
    rt.sync()
    return rt.comm.gather_objects(status)


@on_ranks(LlmShardLocal)
def _shard_local(rt: Runtime, h: LlmShardLocal, fulls: list[np.ndarray] | None) -> None:
    """Each matrix's block: read here (every rank local: read and uploaded one at a time, so a
    rank holds one float32 block at most), or sent by the driver."""
    plans = [Plan(axis, counts) for _, _, _, axis, counts, _ in h.matrices]
    if all(h.local):
        with rt.step("load"):
            for ident, matrix, plan in zip(h.ids, h.matrices, plans, strict=True):
                block = _own_block(rt, h, matrix, plan)
                rt.store(ident, rt.backend.upload(block, h.dtype, h.quant, 1))
                del block
        rt.sync()
        return
    blocks = []
    with rt.step("prepare"):
        blocks = [_own_block(rt, h, matrix, plan) for matrix, plan in zip(h.matrices, plans, strict=True)]
    rt.sync()
    for i, (block, plan) in enumerate(zip(blocks, plans, strict=True)):
        rt.comm.scatter_blocks(None if fulls is None else fulls[i], block, plan, h.local)
    with rt.step("upload"):
        for ident, block in zip(h.ids, blocks, strict=True):
            rt.store(ident, rt.backend.upload(block, h.dtype, h.quant, 1))
    rt.sync()


def _own_block(rt: Runtime, h: LlmShardLocal, matrix: tuple, plan: Plan) -> np.ndarray:
    """This rank's block of one matrix: read from its copy if it is local, else empty (to be
    filled by the driver's scatter)."""
    part, layer, whole, _, _, name = matrix
    rank = rt.comm.rank
    shape = plan.block_shape(tuple(whole), rank)
    if not rt.backend.supports("matmul", h.quant or h.dtype, shape):
        raise CMatrixError(f"{rt.backend.name} on {rt.backend.device} cannot hold a "
                           f"{h.quant or h.dtype} block of shape {shape}")
    if not (h.local[rank] and plan.counts[rank]):
        return empty(shape, h.dtype)
    ckpt = _OPEN.get(h.path) or _OPEN.setdefault(h.path, open_checkpoint(h.path))
    lo = plan.displs[rank]
    block = read_block(ckpt, DecoderConfig(**h.config), part, layer, h.chunk, lo, lo + plan.counts[rank])
    if block.shape != shape:
        raise CMatrixError(f"internal: {name} read as {block.shape}, the plan says {shape}")
    return block if h.dtype == "float32" else from_float32(block, h.dtype)


def read_block(ckpt: Any, cfg: DecoderConfig, part: str, layer: int, chunk: int, lo: int,
               hi: int) -> np.ndarray:
    """Rows (qkv, gate_up, lm_head) or columns (o, down) ``lo:hi`` of a decoder's fused
    weight matrix as float32, reading only the source rows or columns they come from."""
    names = tensor_names(cfg, ckpt)

    def rows(key: str, a: int, b: int) -> np.ndarray:
        tensor, shape = names[key]
        return ckpt.rows(tensor, shape, a, b)

    def columns(key: str) -> np.ndarray:
        tensor, shape = names[key]
        return ckpt.columns(tensor, shape, lo, hi)

    d, i = cfg.head_dim, layer
    if part == "qkv":  # whole KV groups: each one's q heads, k head and v head
        unit = (cfg.group_size + 2) * d
        g0, g1 = lo // unit, hi // unit
        return fuse_qkv(rows(f"{i}.q", g0 * cfg.group_size * d, g1 * cfg.group_size * d),
                        rows(f"{i}.k", g0 * d, g1 * d), rows(f"{i}.v", g0 * d, g1 * d), cfg)
    if part == "gate_up":  # whole chunk pairs: their gate rows and up rows
        p0, p1 = lo // (2 * chunk), hi // (2 * chunk)
        gate, up = (rows(f"{i}.{k}", p0 * chunk, p1 * chunk) for k in ("gate", "up"))
        return fuse_gate_up(gate, up, chunk)
    if part == "lm_head":
        return rows("lm_head", lo, hi)
    if part in ("o", "down"):
        return columns(f"{i}.{part}")
    raise CMatrixError(f"internal: no weight matrix {part!r}")
