"""The resident-weight cache on each node's disk.

Every rank keeps its shard of a named matrix in its own file,
``CACHE_DIR/shards/NAME/rankR.cmshard``; rank 0 also keeps ``manifest.json``,
the record of the last complete save (shape, dtype, plan and every rank's
checksum), written only after every rank's file is in place. A shard file is

    8 bytes  magic ``CMSHARD1``
    4 bytes  little-endian length of the JSON header
    JSON     name, rank, host, shape, dtype, axis, counts, quant, quant_axis,
             block_shape, nbytes, checksum (sha256 of the data)
    padding  to a multiple of 64 bytes
    data     the rank's block, C order, in its storage dtype

``CACHE_DIR`` is ``$CMATRIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/cmatrix``, else
``~/.cache/cmatrix``. Nothing here touches MPI: the commands in
:mod:`cmatrix.ops.cache` and :mod:`cmatrix.ops.placement` call these functions on each rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..core.dtypes import STORAGE
from ..errors import InputError
from . import atomic

MAGIC = b"CMSHARD1"
_ALIGN = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
#: fields of a shard's header that must equal the request for the shard to be reused
COMPARED = ("shape", "dtype", "quant", "quant_axis", "axis", "counts", "block_shape", "checksum")


class StaleShard(Exception):  # noqa: N818 - a finding, reported as a problem, not raised to users
    """This rank's cached shard cannot be used; the message says why."""


def cache_dir() -> Path:
    env = os.environ.get("CMATRIX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cmatrix"


def check_name(name: object) -> str:
    """A cache name becomes a directory name: letters, digits, ``_ . -``; no path parts."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InputError(f"name: a cached matrix needs a name of letters, digits, '_', '.' and '-' "
                         f"(at most 200, no '..'), e.g. 'layers.0.mlp.up'; got {name!r}")
    return name


def shard_path(name: str, rank: int) -> Path:
    return cache_dir() / "shards" / name / f"rank{rank}.cmshard"


def manifest_path(name: str) -> Path:
    return cache_dir() / "shards" / name / "manifest.json"


def checksum(data: np.ndarray) -> str:
    """sha256 of the array's bytes in C order."""
    h = hashlib.sha256()
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, atomic.CHUNK_BYTES):
        h.update(memoryview(flat[start : start + atomic.CHUNK_BYTES]))
    return "sha256:" + h.hexdigest()


def write_shard(meta: dict, data: np.ndarray, on_chunk: Callable[[int], None] | None = None) -> Path:
    """Write this rank's block with its header, atomically; return the file."""
    path = shard_path(meta["name"], meta["rank"])
    head = json.dumps(meta, sort_keys=True).encode()
    start = len(MAGIC) + 4 + len(head)
    pad = -start % _ALIGN
    atomic.sweep_orphans(path.parent)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(head)) + head + b"\0" * pad)
        atomic.write_array(f, data, on_chunk)
    return path


def read_header(path: Path) -> tuple[dict, int]:
    """The header of a shard file and where its data starts; checks the file's size."""
    if not path.is_file():
        raise StaleShard(f"no cached shard: {path} does not exist (save it first with cache='save')")
    size = path.stat().st_size
    with open(path, "rb") as f:
        lead = f.read(len(MAGIC) + 4)
        if len(lead) < len(MAGIC) + 4 or lead[: len(MAGIC)] != MAGIC:
            raise StaleShard(f"{path} is not a cmatrix shard file (bad magic: corrupted or foreign)")
        (length,) = struct.unpack("<I", lead[len(MAGIC) :])
        if length > min(size, 1 << 20):
            raise StaleShard(f"{path}: header length {length} is impossible (file corrupted)")
        try:
            meta = json.loads(f.read(length))
        except (ValueError, RecursionError) as exc:
            raise StaleShard(f"{path}: unreadable header (file corrupted): {exc}") from None
    _check_header(path, meta)
    start = len(MAGIC) + 4 + length
    start += -start % _ALIGN
    want = start + int(meta.get("nbytes", -1))
    if size != want:
        kind = "truncated" if size < want else "longer than its header says"
        raise StaleShard(f"{path} is {kind}: {size} bytes, expected {want}")
    return meta, start


def _check_header(path: Path, meta: object) -> None:
    """The header's own fields agree with each other (the checksum covers only the data)."""
    try:
        block = [int(d) for d in meta["block_shape"]]
        consistent = (int(meta["nbytes"]) == int(np.prod(block)) * STORAGE[meta["dtype"]].itemsize
                      and isinstance(meta["checksum"], str))
    except (TypeError, KeyError, ValueError):
        consistent = False
    if not consistent:
        raise StaleShard(f"{path}: header fields are missing or inconsistent (file corrupted)")


def file_matches(path: Path, expect: dict) -> bool:
    """Whether ``path`` holds a complete shard whose header matches ``expect``."""
    try:
        return difference(read_header(path)[0], expect) is None
    except (StaleShard, OSError):
        return False


def difference(found: dict, expect: dict) -> str | None:
    """What differs between a shard's header and the request (None: reusable)."""
    for key in COMPARED:
        want = expect.get(key)
        if want is None and key in ("checksum", "shape", "dtype", "block_shape"):
            continue  # not known to the driver: anything goes
        if key == "quant_axis" and not expect.get("quant"):
            continue  # meaningless without quantisation
        have = found.get(key)
        if _norm(have) != _norm(want):
            if key == "counts":
                return (f"plan differs: cached split along axis {found.get('axis')} is "
                        f"{have}, requested {want}")
            if key == "checksum":
                return "weight differs: the checksum of this rank's block does not match the data given"
            return f"{key} differs: cached {have}, requested {want}"
    return None


def read_shard(path: Path, meta: dict, start: int,
               on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
    """The block stored in ``path``, verified against the checksum in its header."""
    data = np.empty(tuple(meta["block_shape"]), dtype=STORAGE[meta["dtype"]])
    flat = data.reshape(-1).view(np.uint8)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for pos in range(0, flat.size, atomic.CHUNK_BYTES):
            piece = flat[pos : pos + atomic.CHUNK_BYTES]
            if f.readinto(memoryview(piece)) != piece.size:
                raise StaleShard(f"{path} is truncated (it shrank while being read)")
            h.update(memoryview(piece))
            if on_chunk is not None:
                on_chunk(piece.size)
    if "sha256:" + h.hexdigest() != meta["checksum"]:
        raise StaleShard(f"{path} is corrupted: its data does not match the checksum in its header")
    return data


def remove(name: str, rank: int) -> list[str]:
    """Delete this rank's file of ``name`` (and rank 0's manifest); return what was removed."""
    removed = []
    paths = [shard_path(name, rank)] + ([manifest_path(name)] if rank == 0 else [])
    for p in paths:
        try:
            p.unlink()
            removed.append(str(p))
        except FileNotFoundError:
            pass
    folder = shard_path(name, rank).parent
    with contextlib.suppress(OSError):  # only when no other rank of this host has a file there
        folder.rmdir()
    return removed


def list_disk(rank: int) -> list[dict]:
    """Headers of every shard this rank has on disk (unreadable ones are listed as such)."""
    root = cache_dir() / "shards"
    found = []
    for path in sorted(root.glob(f"*/rank{rank}.cmshard")) if root.is_dir() else []:
        try:
            meta, _ = read_header(path)
        except (StaleShard, OSError) as exc:
            meta = {"name": path.parent.name, "problem": str(exc)}
        found.append({**meta, "file": str(path), "disk_bytes": path.stat().st_size})
    return found


def write_manifest(meta: dict) -> Path:
    path = manifest_path(meta["name"])
    with atomic.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path


def read_manifest(name: str) -> dict | None:
    path = manifest_path(name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as exc:
        raise InputError(f"cache manifest {path} is unreadable ({exc}); save the matrix again "
                         "with cache='save'") from None


def _norm(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
