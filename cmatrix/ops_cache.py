"""Cache commands every rank runs: check what it holds, list it, free it.

The shard command (:mod:`.ops`) uses :func:`take_reused` and
:func:`save_and_register` to reuse or persist blocks; the driver's side of
these decisions is :mod:`.caching`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import cache, faults
from .runtime import Runtime, command


@command("cache_check")
def cache_check(rt: Runtime, h: dict, _: Any) -> list[dict] | None:
    """Can this rank reuse its shard of ``h["name"]`` as ``h["expect"][rank]`` describes?

    A shard in memory with the same header is reused as is; else the disk
    file's header is compared, its data read and verified, and kept staged for
    the shard command that follows. Findings are reported, not raised.
    """
    comm = rt.comm
    name, expect = h["name"], h["expect"][comm.rank]
    path = cache.shard_path(name, comm.rank)
    status = {"rank": comm.rank, "host": comm.host, "file": str(path), "source": None, "problem": None}
    with rt.step("check"):
        resident = rt.named.get(name)
        if (resident is not None and cache.difference(resident[1], expect) is None
                and (not h.get("need_file") or cache.file_matches(path, expect))):
            status["source"] = "memory"  # auto also needs the file, as its manifest will say
        else:
            try:
                meta, start = cache.read_header(path)
                problem = cache.difference(meta, expect)
                if problem:
                    raise cache.StaleShard(f"{path}: {problem}")
                bar = rt.progress(meta["nbytes"], f"load {name}")
                with bar:
                    data = cache.read_shard(path, meta, start, bar.update)
                rt.staged = (name, data, meta)
                status["source"] = "disk"
            except (cache.StaleShard, OSError) as exc:
                status["problem"] = str(exc)
    rt.sync()
    return comm.gather_objects(status)


def take_reused(rt: Runtime, name: str) -> tuple[str, Any, dict]:
    """What cache_check found: ("memory", resident block, header) or ("disk", data, header)."""
    resident = rt.named.get(name)
    if rt.staged is not None and rt.staged[0] == name:
        _, data, meta = rt.staged
        rt.staged = None
        return "disk", data, meta
    if resident is None:
        raise RuntimeError(f"cache {name!r}: nothing checked to reuse on this rank")
    return "memory", resident[0], resident[1]


def save_and_register(rt: Runtime, h: dict, block: np.ndarray | None, reused_meta: dict | None) -> dict:
    """Persist this rank's block if asked, remember it by name; return its header."""
    c = h["cache"]
    rank = rt.comm.rank
    if reused_meta is not None:
        meta = reused_meta
    else:
        meta = {"name": c["name"], "rank": rank, "host": rt.comm.host, "shape": list(h["shape"]),
                "dtype": h["dtype"], "axis": h["axis"], "counts": list(h["counts"]),
                "quant": h.get("quant"), "quant_axis": h.get("quant_axis", 0),
                "block_shape": list(block.shape), "nbytes": int(block.nbytes),
                "checksum": cache.checksum(block)}
        if c["save"]:
            bar = rt.progress(block.nbytes, f"save {c['name']}")

            def written(nbytes: int) -> None:
                bar.update(nbytes)
                faults.check(rt.op, "mid-write", rank)  # tests kill a rank here

            with bar:
                meta["file"] = str(cache.write_shard(meta, block, written))
    rt.named[c["name"]] = (rt.block(h["id"]), meta)
    return meta


@command("cache_free")
def cache_free(rt: Runtime, h: dict, _: Any) -> list[dict] | None:
    """Release handles ``h["ids"]``; with ``disk`` also delete this rank's file of ``name``."""
    for ident in h["ids"]:
        rt.free(ident)
    removed: list[str] = []
    with rt.step("remove"):
        rt.named.pop(h["name"], None)
        if h["disk"]:
            removed = cache.remove(h["name"], rt.comm.rank)
    rt.sync()
    return rt.comm.gather_objects({"rank": rt.comm.rank, "removed": removed})


@command("cache_list")
def cache_list(rt: Runtime, h: dict, _: Any) -> list[list[dict]] | None:
    """This rank's cached matrices: in memory (bytes resident) and on disk (file bytes)."""
    rows: dict[str, dict] = {}
    with rt.step("list"):
        for entry in cache.list_disk(rt.comm.rank):
            rows[entry["name"]] = {**entry, "memory_bytes": 0}
        for name, (_, meta) in rt.named.items():
            row = rows.setdefault(name, {**meta, "disk_bytes": 0, "file": None})
            row["memory_bytes"] = int(meta["nbytes"])
        for row in rows.values():
            row.update(rank=rt.comm.rank, host=rt.comm.host)
    rt.sync()
    return rt.comm.gather_objects(list(rows.values()))

