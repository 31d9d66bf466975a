"""The driver's side of the resident-weight cache: decide what to send, report what is stale.

``cl.shard(w, name=..., cache=...)``:

* ``"save"`` sends every shard, keeps it resident and writes it to each
  rank's disk; rank 0 records the save in a manifest once every file is in place.
* ``"load"`` sends nothing: each rank reuses the shard it holds in memory, else
  reads and verifies its file. ``w`` may be None (shape, dtype and checksums
  come from the driver's manifest) or the weight (its checksums are compared).
  Any rank missing or stale fails the call with a :class:`CacheError`.
* ``"auto"`` needs ``w``: ranks whose shard is identical reuse it; the others
  are sent theirs and save it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cache, ops
from . import quant as q
from .arrays import check_matrix, from_user
from .checks import check_axis
from .errors import CacheError, InputError
from .matrix import ShardedMatrix
from .plan import Plan, validate_weights
from .ranks import format_bytes

if TYPE_CHECKING:
    from .cluster import Cluster

MODES = ("save", "load", "auto")


def shard_cached(cl: Cluster, w: Any, name: str | None, weights: Sequence[float] | None, axis: int,
                 quant: str | None, quant_axis: int, mode: str, align: int = 1) -> ShardedMatrix:
    if mode not in MODES:
        raise InputError(f"cache: expected one of {', '.join(map(repr, MODES))} or None, got {mode!r}")
    if name is None:
        raise InputError(f"cache={mode!r} needs a name, e.g. cl.shard(w, name='layers.0.up', cache=...)")
    cache.check_name(name)
    shares = cl.weights if weights is None else validate_weights(weights, cl.size)
    if w is None:
        if mode != "load":
            raise InputError(f"w: cache={mode!r} needs the weight; only cache='load' can do without it")
        host, spec = None, _from_manifest(cl, name)
    else:
        host = from_user(w, "w")
        check_matrix(host, "w")
        spec = {"shape": list(host.shape), "dtype": host.dtype, "axis": check_axis(axis, "axis"),
                "quant": quant, "quant_axis": check_axis(quant_axis, "quant_axis"), "kind": host.kind}
        if quant is not None:
            q.check_kind(quant)
            q.check_row_length(host.shape[quant_axis], quant, f"w.shape[{quant_axis}] (quant_axis)")
    if spec["quant"] and spec["quant_axis"] == spec["axis"]:
        align = math.lcm(align, q.BLOCK)
    plan = Plan.from_weights(spec["shape"][spec["axis"]], shares, spec["axis"], align)
    if spec["quant"] is None:
        cl._check_dtype(spec["dtype"], plan.counts)
    reuse = [False] * cl.size
    if mode != "save":
        expect = _expectations(cl, name, spec, plan, host)
        statuses = cl._run({"op": "cache_check", "name": name, "expect": expect,
                            "need_file": mode == "auto"})
        stale = [s for s in statuses if s["problem"]]
        if mode == "load" and stale:
            raise CacheError(_report(cl, name, stale, len(statuses)), stale)
        reuse = [s["problem"] is None for s in statuses]
    header = {"op": "shard", "id": cl._new_id(), "shape": tuple(spec["shape"]), "dtype": spec["dtype"],
              "axis": plan.axis, "counts": plan.counts, "quant": spec["quant"],
              "quant_axis": spec["quant_axis"], "name": name,
              "cache": {"name": name, "reuse": reuse, "save": mode != "load"},
              "bands": ops.band_count(tuple(spec["shape"]), spec["dtype"], plan)}
    payload = None if all(reuse) else np.ascontiguousarray(host.data)
    metas = cl._run(header, payload)
    dtype = "float32" if spec["quant"] else spec["dtype"]
    m = ShardedMatrix(cl, header["id"], tuple(spec["shape"]), dtype, plan, name, spec["kind"],
                      spec["quant"], spec["quant_axis"])
    m.cached = True
    cl._named.setdefault(name, weakref.WeakSet()).add(m)
    if payload is not None and mode != "load":  # the handle exists first: a failure here leaks nothing
        cache.write_manifest({**spec, "name": name, "counts": list(plan.counts),
                              "checksums": [m["checksum"] for m in metas],
                              "hosts": [m["host"] for m in metas]})
    return m


def _from_manifest(cl: Cluster, name: str) -> dict:
    manifest = cache.read_manifest(name)
    if manifest is None:
        host = cl.ranks[0].host if len(cl.ranks) else "the driver"
        raise CacheError(f"cache {name!r}: no saved copy is recorded on the driver ({host}): "
                         f"{cache.manifest_path(name)} does not exist. Save it first with "
                         "cl.shard(w, name=..., cache='save'), or pass the weight with cache='auto'",
                         [])
    return {k: manifest[k] for k in ("shape", "dtype", "axis", "quant", "quant_axis", "kind", "checksums",
                                     "counts")}


def _expectations(cl: Cluster, name: str, spec: dict, plan: Plan, host: Any) -> list[dict]:
    """What each rank's shard must be: header fields, and its checksum where known."""
    if host is not None:
        sums = [cache.checksum(_block(host.data, plan, r)) for r in range(cl.size)]
    elif list(spec["counts"]) == list(plan.counts):
        sums = spec["checksums"]
    else:
        sums = [None] * cl.size  # the plan differs: every rank reports that first
    common = {"name": name, "shape": list(spec["shape"]), "dtype": spec["dtype"], "axis": plan.axis,
              "counts": list(plan.counts), "quant": spec["quant"], "quant_axis": spec["quant_axis"]}
    return [{**common, "checksum": s, "block_shape": list(plan.block_shape(tuple(spec["shape"]), r))}
            for r, s in enumerate(sums)]


def _block(data: np.ndarray, plan: Plan, rank: int) -> np.ndarray:
    return data[plan.block(rank)] if plan.axis == 0 else data[:, plan.block(rank)]


def _report(cl: Cluster, name: str, stale: list[dict], size: int) -> str:
    lines = [f"cache {name!r} cannot be loaded: {len(stale)} of {size} ranks have no usable shard"]
    for s in stale:
        backend = cl.ranks[s["rank"]].backend if len(cl.ranks) > s["rank"] else "?"
        lines.append(f"  rank {s['rank']} on host {s['host']} ({backend}): {s['problem']}")
    lines.append("Save it again with cache='save', or pass the weight with cache='auto' "
                 "(it sends only the stale shards).")
    return "\n".join(lines)


def free_cached(cl: Cluster, name: str, handles: list[ShardedMatrix], disk: bool) -> list[str]:
    """Release ``handles`` of cached matrix ``name``; with ``disk`` delete its files on every rank."""
    ids = []
    for m in handles:
        if not m.freed:
            m.freed = True
            ids.append(m.id)
    reports = cl._run({"op": "cache_free", "name": name, "ids": ids, "disk": disk})
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


def listing(cl: Cluster) -> CacheListing:
    per_rank = cl._run({"op": "cache_list"})
    return CacheListing(sorted((e for rows in per_rank for e in rows), key=lambda e: (e["name"], e["rank"])))
