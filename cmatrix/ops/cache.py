"""The resident-weight cache: which shards ranks can reuse, listing and deleting them.

``cl.shard(w, name=..., cache=...)``:

* ``"save"`` sends every shard, keeps it resident and writes it to each rank's disk
  (:mod:`cmatrix.io.shardfiles`); rank 0 records the save in a manifest once every file
  is in place.
* ``"load"`` sends nothing: each rank reuses the shard it holds in memory, else reads
  and verifies its file. ``w`` may be None (shape, dtype and checksums come from the
  driver's manifest) or the weight (its checksums are compared). Any rank missing or
  stale fails the call with a :class:`CacheError`.
* ``"auto"`` needs ``w``: ranks whose shard is identical reuse it; the others are sent
  theirs and save it.

The ``cache_check`` command finds what each rank can reuse; the ``shard`` command
(:mod:`.placement`) then sends only the rest.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import quant as q
from ..core.arrays import check_matrix
from ..core.checks import check_axis
from ..core.dtypes import STORAGE
from ..core.plan import Plan, validate_weights
from ..engine.driver import Driver
from ..engine.protocol import Header, on_ranks
from ..engine.ranks import format_bytes
from ..engine.runtime import Runtime
from ..errors import CacheError, InputError
from ..io import shardfiles
from ..io.store import from_user
from .handles import Matrix, ShardedMatrix, check_live
from .placement import CacheUse, PlacementMethods, Shard, band_count, check_quant, check_source

MODES = ("save", "load", "auto")


class CachedMatrix(ShardedMatrix):
    """A sharded matrix with a name in the cache: it can be freed with its files."""

    cached = True

    def free(self, disk: bool = False) -> None:
        """Release this matrix's memory on every rank; ``disk=True`` also deletes its cache files."""
        if disk:
            free_cached(self.driver, self.name, [self], disk=True)
        else:
            super().free()


@dataclass(frozen=True)
class CacheCheck(Header, op="cache_check"):
    name: str
    #: per rank: what its shard must be (header fields, and its checksum where known)
    expect: tuple[dict, ...]
    #: "auto" also needs the file, as its manifest will say
    need_file: bool


@dataclass(frozen=True)
class CacheFree(Header, op="cache_free"):
    name: str
    ids: tuple[int, ...]
    disk: bool


@dataclass(frozen=True)
class CacheList(Header, op="cache_list"):
    pass


class CacheMethods(PlacementMethods):
    """``Cluster.shard`` with ``cache=``, ``free`` and ``cached``; the one hook used is ``driver``."""

    def shard(self, w: Any, name: str | None = None, weights: Sequence[float] | None = None,
              axis: int = 1, quant: str | None = None, quant_axis: int = 0,
              cache: str | None = None, align: int = 1) -> ShardedMatrix:
        """Split ``w`` along ``axis`` (1: columns, 0: rows) in proportion to
        ``weights`` (default: the cluster's) and keep each block resident on its rank.

        ``cache`` (needs ``name``): "save" also writes each shard to its node's
        disk; "load" sends nothing and reuses what the ranks hold in memory or on
        disk (``w`` may be None: shape, dtype and layout come from the cache);
        "auto" reuses identical shards and sends the rest. A missing or stale
        shard fails "load" with a :class:`CacheError` naming rank, host, file
        and the difference. See :mod:`cmatrix.ops.cache`.

        ``quant`` ("q8_0" or "q4_0") rounds the weight to 32-value blocks along
        ``quant_axis``, the axis a matmul with it contracts: 0 for ``x @ w``,
        1 for ``x @ w.T`` (``transpose_b=True``, the layout of torch's Linear).
        ggml ranks store the blocks; other backends hold their float32 values.

        ``align``: every rank's count is a multiple of it (e.g. a head's width,
        so attention or rope can work on whole heads), the remainder aside.
        """
        if cache is None:
            return super().shard(w, name, weights, axis, quant, quant_axis, align)
        align = check_source(w, align)
        return shard_cached(self.driver, w, name, weights, axis, quant, quant_axis, cache, align)

    def free(self, m: Matrix | str, disk: bool = False) -> None:
        """Release ``m`` (a handle, or the name of a cached matrix: all its handles)
        on every rank; ``disk=True`` also deletes the cache files of its name."""
        d = self.driver
        if isinstance(m, str):
            handles = [h for h in d.named.get(m, ()) if not h.freed]
            if not handles and not disk:
                raise InputError(f"m: no cached matrix named {m!r} is resident; pass disk=True "
                                 "to delete its files")
            free_cached(d, shardfiles.check_name(m), handles, disk)
            return
        if disk:
            if not isinstance(m, Matrix) or m.driver is not d:
                raise InputError(f"m: expected a matrix handle from this cluster, got {type(m).__name__}")
            m.free(disk=True)
            return
        check_live(d, m, "m")
        m.free()

    def cached(self) -> CacheListing:
        """What every rank holds of the cache: name, shape, dtype, bytes in memory and on disk."""
        per_rank = self.driver.run(CacheList())
        rows = (e for per in per_rank for e in per)
        return CacheListing(sorted(rows, key=lambda e: (e["name"], e["rank"])))


def shard_cached(d: Driver, w: Any, name: str | None, weights: Sequence[float] | None, axis: int,
                 quant: str | None, quant_axis: int, mode: str, align: int = 1) -> CachedMatrix:
    """The driver's half of a cached shard: check, ask every rank what it can reuse, send the rest."""
    if mode not in MODES:
        raise InputError(f"cache: expected one of {', '.join(map(repr, MODES))} or None, got {mode!r}")
    if name is None:
        raise InputError(f"cache={mode!r} needs a name, e.g. cl.shard(w, name='layers.0.up', cache=...)")
    shardfiles.check_name(name)
    shares = d.weights if weights is None else validate_weights(weights, d.size)
    if w is None:
        if mode != "load":
            raise InputError(f"w: cache={mode!r} needs the weight; only cache='load' can do without it")
        host, spec = None, _from_manifest(d, name)
    else:
        host = from_user(w, "w")
        check_matrix(host, "w")
        spec = {"shape": list(host.shape), "dtype": host.dtype, "axis": check_axis(axis, "axis"),
                "quant": quant, "quant_axis": check_axis(quant_axis, "quant_axis"), "kind": host.kind}
        if quant is not None:
            check_quant(host.shape, quant, quant_axis)
    if spec["quant"] and spec["quant_axis"] == spec["axis"]:
        align = math.lcm(align, q.BLOCK)
    plan = Plan.from_weights(spec["shape"][spec["axis"]], shares, spec["axis"], align)
    if spec["quant"] is None:
        d.check_dtype(spec["dtype"], plan.counts)
    reuse = [False] * d.size
    if mode != "save":
        statuses = d.run(CacheCheck(name, _expectations(d, name, spec, plan, host), mode == "auto"))
        stale = [s for s in statuses if s["problem"]]
        if mode == "load" and stale:
            raise CacheError(_report(d, name, stale, len(statuses)), stale)
        reuse = [s["problem"] is None for s in statuses]
    shape = tuple(spec["shape"])
    header = Shard(d.new_id(), shape, spec["dtype"], plan.axis, plan.counts, spec["quant"],
                   spec["quant_axis"], name, band_count(shape, spec["dtype"], plan),
                   CacheUse(tuple(reuse), mode != "load"))
    payload = None if all(reuse) else np.ascontiguousarray(host.data)
    metas = d.run(header, payload)
    dtype = "float32" if spec["quant"] else spec["dtype"]
    m = CachedMatrix(d, header.id, shape, dtype, plan, name, spec["kind"], spec["quant"], spec["quant_axis"])
    d.named.setdefault(name, weakref.WeakSet()).add(m)
    if payload is not None and mode != "load":  # the handle exists first: a failure here leaks nothing
        shardfiles.write_manifest({**spec, "name": name, "counts": list(plan.counts),
                                   "checksums": [m["checksum"] for m in metas],
                                   "hosts": [m["host"] for m in metas]})
    return m


def _from_manifest(d: Driver, name: str) -> dict:
    manifest = shardfiles.read_manifest(name)
    if manifest is None:
        host = d.ranks[0].host if len(d.ranks) else "the driver"
        raise CacheError(f"cache {name!r}: no saved copy is recorded on the driver ({host}): "
                         f"{shardfiles.manifest_path(name)} does not exist. Save it first with "
                         "cl.shard(w, name=..., cache='save'), or pass the weight with cache='auto'",
                         [])
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheError(f"cache {name!r}: the manifest {shardfiles.manifest_path(name)} is damaged "
                         f"({problem}); save the matrix again with cache='save'", [])
    return {k: manifest[k] for k in ("shape", "dtype", "axis", "quant", "quant_axis", "kind", "checksums",
                                     "counts")}


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a manifest read from disk (None: it describes a usable save)."""
    def naturals(x: Any, n: int | None = None) -> bool:
        return isinstance(x, list) and (n is None or len(x) == n) and \
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)

    if not isinstance(m, dict):
        return "not a JSON object"
    checks = {
        "shape": naturals(m.get("shape"), 2) and 0 not in m["shape"],
        "dtype": m.get("dtype") in STORAGE,
        "axis": m.get("axis") in (0, 1) and not isinstance(m.get("axis"), bool),
        "quant": m.get("quant") is None or m.get("quant") in q.KINDS,
        "quant_axis": m.get("quant_axis") in (0, 1) and not isinstance(m.get("quant_axis"), bool),
        "kind": m.get("kind") in ("numpy", "torch"),
        "counts": naturals(m.get("counts")) and len(m["counts"]) > 0,
        "checksums": isinstance(m.get("checksums"), list)
        and all(isinstance(c, str) for c in m["checksums"]),
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        return f"missing or malformed: {', '.join(bad)}"
    if len(m["checksums"]) != len(m["counts"]) or sum(m["counts"]) != m["shape"][m["axis"]]:
        return "its checksums, counts and shape do not agree"
    return None


def _expectations(d: Driver, name: str, spec: dict, plan: Plan, host: Any) -> tuple[dict, ...]:
    """What each rank's shard must be: header fields, and its checksum where known."""
    if host is not None:
        sums = [shardfiles.checksum(_block(host.data, plan, r)) for r in range(d.size)]
    elif list(spec["counts"]) == list(plan.counts):
        sums = spec["checksums"]
    else:
        sums = [None] * d.size  # the plan differs: every rank reports that first
    common = {"name": name, "shape": list(spec["shape"]), "dtype": spec["dtype"], "axis": plan.axis,
              "counts": list(plan.counts), "quant": spec["quant"], "quant_axis": spec["quant_axis"]}
    return tuple({**common, "checksum": s, "block_shape": list(plan.block_shape(tuple(spec["shape"]), r))}
                 for r, s in enumerate(sums))


def _block(data: np.ndarray, plan: Plan, rank: int) -> np.ndarray:
    return data[plan.block(rank)] if plan.axis == 0 else data[:, plan.block(rank)]


def _report(d: Driver, name: str, stale: list[dict], size: int) -> str:
    lines = [f"cache {name!r} cannot be loaded: {len(stale)} of {size} ranks have no usable shard"]
    for s in stale:
        backend = d.ranks[s["rank"]].backend if len(d.ranks) > s["rank"] else "?"
        lines.append(f"  rank {s['rank']} on host {s['host']} ({backend}): {s['problem']}")
    lines.append("Save it again with cache='save', or pass the weight with cache='auto' "
                 "(it sends only the stale shards).")
    return "\n".join(lines)


def free_cached(d: Driver, name: str, handles: list[ShardedMatrix], disk: bool) -> list[str]:
    """Release ``handles`` of cached matrix ``name``; with ``disk`` delete its files on every rank."""
    ids = []
    for m in handles:
        if not m.freed:
            m.freed = True
            ids.append(m.id)
    reports = d.run(CacheFree(name, tuple(ids), disk))
    return [path for r in reports for path in r["removed"]]


class CacheListing(list):
    """What every rank holds: one dict per (rank, name), printable as a table."""

    COLUMNS = ("rank", "host", "name", "shape", "dtype", "memory", "disk")

    def __str__(self) -> str:
        rows = [self.COLUMNS] + [
            (str(e["rank"]), e["host"], e["name"], "x".join(map(str, e.get("shape") or ["?"])),
             e.get("quant") or e.get("dtype", "?"), format_bytes(e["memory_bytes"]),
             format_bytes(e["disk_bytes"]) + (" (unreadable)" if e.get("problem") else ""))
            for e in self]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    __repr__ = __str__


# ---- rank halves -------------------------------------------------------------------------

@on_ranks(CacheCheck)
def _cache_check(rt: Runtime, h: CacheCheck, _: Any) -> list[dict] | None:
    """Can this rank reuse its shard of ``h.name`` as ``h.expect[rank]`` describes?

    A shard in memory with the same header is reused as is; else the disk file's
    header is compared, its data read and verified, and handed on to the shard command
    that follows. Findings are reported, not raised.
    """
    comm = rt.comm
    path = shardfiles.shard_path(h.name, comm.rank)
    status = {"rank": comm.rank, "host": comm.host, "file": str(path), "source": None, "problem": None}
    with rt.step("check"):
        expect = h.expect[comm.rank]
        resident = rt.named.get(h.name)
        if (resident is not None and shardfiles.difference(resident[1], expect) is None
                and (not h.need_file or shardfiles.file_matches(path, expect))):
            status["source"] = "memory"
        else:
            try:
                meta, start = shardfiles.read_header(path)
                problem = shardfiles.difference(meta, expect)
                if problem:
                    raise shardfiles.StaleShard(f"{path}: {problem}")
                bar = rt.progress(meta["nbytes"], f"load {h.name}")
                with bar:
                    data = shardfiles.read_shard(path, meta, start, bar.update)
                rt.hand_on((h.name, data, meta))
                status["source"] = "disk"
            except (shardfiles.StaleShard, OSError) as exc:
                status["problem"] = str(exc)
    rt.sync()
    return comm.gather_objects(status)


@on_ranks(CacheFree)
def _cache_free(rt: Runtime, h: CacheFree, _: Any) -> list[dict] | None:
    """Release handles ``h.ids``; with ``disk`` also delete this rank's file of ``name``."""
    for ident in h.ids:
        rt.free(ident)
    removed: list[str] = []
    with rt.step("remove"):
        rt.named.pop(h.name, None)
        if h.disk:
            removed = shardfiles.remove(h.name, rt.comm.rank)
    rt.sync()
    return rt.comm.gather_objects({"rank": rt.comm.rank, "removed": removed})


@on_ranks(CacheList)
def _cache_list(rt: Runtime, h: CacheList, _: Any) -> list[list[dict]] | None:
    """This rank's cached matrices: in memory (bytes resident) and on disk (file bytes)."""
    rows: dict[str, dict] = {}
    with rt.step("list"):
        for entry in shardfiles.list_disk(rt.comm.rank):
            rows[entry["name"]] = {**entry, "memory_bytes": 0}
        for name, (_, meta) in rt.named.items():
            row = rows.setdefault(name, {**meta, "disk_bytes": 0, "file": None})
            row["memory_bytes"] = int(meta["nbytes"])
        for row in rows.values():
            row.update(rank=rt.comm.rank, host=rt.comm.host)
    rt.sync()
    return rt.comm.gather_objects(list(rows.values()))
