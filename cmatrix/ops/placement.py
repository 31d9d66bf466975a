"""Placement: matrices onto the ranks, sharded (``shard``) or whole on every rank
(``replicate``), kept resident until freed. Both halves of each command are here.

A shard's blocks come from the driver (``Scatterv``, or subarray sends for column blocks
of a multi-row matrix, in bands with a progress bar), or, for a cached matrix that
:mod:`.cache` found reusable on a rank, from that rank's memory or disk; a rank saves
its block to its own disk when the cache asks it to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import quant as q
from ..core.arrays import HostArray, check_matrix
from ..core.checks import check_axis
from ..core.dtypes import STORAGE, empty
from ..core.plan import Plan, validate_weights
from ..engine import faults
from ..engine.driver import Driver
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import CMatrixError, InputError
from ..io import shardfiles
from ..io.store import from_user
from .handles import Matrix, ReplicatedMatrix, ShardedMatrix, gather

#: a transfer this large goes in bands, so the driver can show progress
BAND_BYTES = 64 << 20


@dataclass(frozen=True)
class CacheUse:
    """How a cached shard reaches each rank: ``reuse[r]`` takes what rank r holds (memory or
    disk, as the cache check found); ``save`` writes what was sent to each rank's disk."""

    reuse: tuple[bool, ...]
    save: bool


@dataclass(frozen=True)
class Shard(Header, op="shard"):
    id: int
    shape: tuple[int, int]
    dtype: str
    axis: int
    counts: tuple[int, ...]
    quant: str | None
    quant_axis: int
    name: str | None
    #: how many bands the driver sends the matrix in (see :func:`band_count`)
    bands: int
    cache: CacheUse | None = None

    CREATES = ("id",)

    @property
    def frees_first(self) -> bool:  # type: ignore[override]
        # A handle collected since the cache check may be the one whose block this reuses.
        return self.cache is None

    @property
    def plan(self) -> Plan:
        return Plan(self.axis, self.counts)


@dataclass(frozen=True)
class Replicate(Header, op="replicate"):
    id: int
    shape: tuple[int, int]
    dtype: str

    CREATES = ("id",)


class PlacementMethods:
    """``Cluster.shard``, ``replicate`` and ``gather``; the one hook used is ``driver``."""

    driver: Driver

    def shard(self, w: Any, name: str | None = None, weights: Sequence[float] | None = None,
              axis: int = 1, quant: str | None = None, quant_axis: int = 0, align: int = 1) -> ShardedMatrix:
        """Split ``w`` along ``axis`` (1: columns, 0: rows) in proportion to ``weights``
        (default: the cluster's) and keep each block resident on its rank; see
        :meth:`cmatrix.ops.cache.CacheMethods.shard` for every option."""
        d = self.driver
        align = check_source(w, align)
        host = from_user(w, "w")
        check_matrix(host, "w")
        axis = check_axis(axis, "axis")
        if quant is not None:
            quant_axis = check_quant(host.shape, quant, quant_axis)
            if quant_axis == axis:  # every rank holds whole blocks
                align = math.lcm(align, q.BLOCK)
        shares = d.weights if weights is None else validate_weights(weights, d.size)
        plan = Plan.from_weights(host.shape[axis], shares, axis, align)
        return shard_host(d, host, plan, name, quant, quant_axis)

    def replicate(self, x: Any, name: str | None = None) -> ReplicatedMatrix:
        """Send ``x`` whole to every rank and keep it resident (for reuse across calls)."""
        d = self.driver
        host = from_user(x, "x")
        check_matrix(host, "x")
        d.check_dtype(host.dtype)
        ident = d.new_id()
        d.run(Replicate(ident, host.shape, host.dtype), np.ascontiguousarray(host.data))
        return ReplicatedMatrix(d, ident, host.shape, host.dtype, name, host.kind)

    def gather(self, m: Matrix) -> Any:
        """The whole matrix ``m`` on the driver, as numpy or torch like its source."""
        return gather(self.driver, m)


def check_source(w: Any, align: Any) -> int:
    """What any shard() refuses first: a matrix already on the cluster, a bad ``align``."""
    if isinstance(w, Matrix):
        raise InputError("w: already on the cluster; shard() takes an array, tensor or path")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise InputError(f"align: a positive integer, got {align!r}")
    return align


def check_quant(shape: tuple[int, int], quant: str, quant_axis: Any) -> int:
    """A known quantisation whose blocks fit along ``quant_axis``; returns that axis."""
    q.check_kind(quant)
    quant_axis = check_axis(quant_axis, "quant_axis")
    q.check_row_length(shape[quant_axis], quant, f"w.shape[{quant_axis}] (quant_axis)")
    return quant_axis


def band_count(shape: tuple[int, int], dtype: str, plan: Plan) -> int:
    """How many bands the driver sends a matrix in (it puts the number in the header)."""
    rows, cols = shape
    most = rows if plan.axis == 1 else max(max(plan.counts), 1)
    return int(max(1, min(most, -(-rows * cols * STORAGE[dtype].itemsize // BAND_BYTES))))


def shard_host(d: Driver, host: HostArray, plan: Plan, name: str | None = None,
               quant: str | None = None, quant_axis: int = 0) -> ShardedMatrix:
    """Send checked host data to the ranks split by ``plan``; the handle of the result."""
    if quant is None:
        d.check_dtype(host.dtype, plan.counts)
    ident = d.new_id()
    d.run(Shard(ident, host.shape, host.dtype, plan.axis, plan.counts, quant, quant_axis, name,
                band_count(host.shape, host.dtype, plan)), np.ascontiguousarray(host.data))
    # A quantised matrix holds float32 values (block scale times code).
    dtype = "float32" if quant else host.dtype
    return ShardedMatrix(d, ident, host.shape, dtype, plan, name, host.kind, quant, quant_axis)


# ---- rank halves -------------------------------------------------------------------------

@on_ranks(Shard)
def _shard(rt: Runtime, h: Shard, full: np.ndarray | None) -> list[dict] | None:
    """Each rank's block of the driver's ``full``, kept resident.

    With ``h.cache``: ranks marked in ``reuse`` take the shard the cache check found (in
    memory, or read from disk and handed on) and nothing is sent to them; the others
    receive theirs and, with ``save``, write it to disk. Returns every rank's cache
    header (None without a cache).
    """
    plan, rank, c = h.plan, rt.comm.rank, h.cache
    reuse = c.reuse if c else (False,) * rt.comm.size
    block = reused = None
    with rt.step("prepare"):
        shape = plan.block_shape(h.shape, rank)
        if reuse[rank]:
            reused = _take_reused(rt, h.name)
        else:
            rows = shape if h.quant_axis == 1 else shape[::-1]  # quantised rows run along quant_axis
            if not rt.backend.supports("matmul", h.quant or h.dtype, rows):
                raise CMatrixError(f"{rt.backend.name} on {rt.backend.device} cannot hold a "
                                   f"{h.quant or h.dtype} block of shape {shape}")
            block = empty(shape, h.dtype)
    rt.sync()
    if not all(reuse):
        _scatter_in_bands(rt, h, full, block, reuse)
    with rt.step("upload"):
        if reused and reused[0] == "memory":
            rt.alias(h.id, reused[1])
        else:
            if reused:
                block = reused[1]
            rt.store(h.id, rt.backend.upload(block, h.dtype, h.quant, h.quant_axis))
    rt.sync()
    if not c:
        return None
    with rt.step("save"):
        meta = _save_and_register(rt, h, block, reused[2] if reused else None)
    rt.sync()
    return rt.comm.gather_objects(meta)


def _take_reused(rt: Runtime, name: str) -> tuple[str, Any, dict]:
    """What the cache check found: ("memory", resident block, header) or ("disk", data, header)."""
    if rt.handed is not None and rt.handed[0] == name:
        _, data, meta = rt.handed
        return "disk", data, meta
    resident = rt.named.get(name)
    if resident is None:
        raise RuntimeError(f"cache {name!r}: nothing checked to reuse on this rank")
    return "memory", resident[0], resident[1]


def _save_and_register(rt: Runtime, h: Shard, block: np.ndarray | None, reused_meta: dict | None) -> dict:
    """Persist this rank's block if asked, remember it by name; return its header."""
    rank = rt.comm.rank
    if reused_meta is not None:
        meta = reused_meta
    else:
        meta = {"name": h.name, "rank": rank, "host": rt.comm.host, "shape": list(h.shape),
                "dtype": h.dtype, "axis": h.axis, "counts": list(h.counts),
                "quant": h.quant, "quant_axis": h.quant_axis,
                "block_shape": list(block.shape), "nbytes": int(block.nbytes),
                "checksum": shardfiles.checksum(block)}
        if h.cache.save:
            bar = rt.progress(block.nbytes, f"save {h.name}")

            def written(nbytes: int) -> None:
                bar.update(nbytes)
                faults.check(rt.op, "mid-write", rank)  # tests kill a rank here

            with bar:
                meta["file"] = str(shardfiles.write_shard(meta, block, written))
    rt.named[h.name] = (rt.block(h.id), meta)
    return meta


def _scatter_in_bands(rt: Runtime, h: Shard, full: np.ndarray | None, block: np.ndarray | None,
                      skip: tuple[bool, ...]) -> None:
    """scatter_blocks in bands of about BAND_BYTES, with a progress bar on the driver.

    The driver chose the number of bands (``h.bands``). Column blocks (axis 1) are cut
    into bands of whole rows; row blocks (axis 0) into equal fractions of each rank's
    rows. A skipped rank takes part with an empty block.
    """
    comm, rank, plan = rt.comm, rt.comm.rank, h.plan
    rows, cols = h.shape
    itemsize = STORAGE[h.dtype].itemsize
    if block is None:  # reused here: an empty stand-in with the block's other dimension
        dummy = list(plan.block_shape(h.shape, rank))
        dummy[plan.axis] = 0
        block = empty(tuple(dummy), h.dtype)
    active = [0 if s else c for c, s in zip(plan.counts, skip, strict=True)]
    sent = sum(active) * (cols if plan.axis == 0 else rows)
    with rt.progress(sent * itemsize, f"send {h.name or 'matrix'}") as bar:
        if h.bands == 1:
            comm.scatter_blocks(full, block, plan, skip)
            bar.update(sent * itemsize)
            return
        for k in range(h.bands):
            if plan.axis == 1:
                lo, hi = k * rows // h.bands, (k + 1) * rows // h.bands
                comm.scatter_blocks(None if full is None else full[lo:hi], block[lo:hi], plan, skip)
                bar.update((hi - lo) * sum(active) * itemsize)
                continue
            los = [k * c // h.bands for c in plan.counts]
            his = [(k + 1) * c // h.bands for c in plan.counts]
            counts = [min(a, hi - lo) for a, lo, hi in zip(active, los, his, strict=True)]
            displs = [d + lo for d, lo in zip(plan.displs, los, strict=True)]
            comm.scatter_rows(full, block[los[rank] : los[rank] + counts[rank]], counts, displs)
            bar.update(sum(counts) * cols * itemsize)


@on_ranks(Replicate)
def _replicate(rt: Runtime, h: Replicate, full: np.ndarray | None) -> None:
    with rt.step("prepare"):
        # The driver keeps its own copy: the caller may change its array later.
        buf = full.copy() if rt.comm.is_driver else empty(h.shape, h.dtype)
    rt.sync()
    rt.comm.bcast(buf)
    with rt.step("upload"):
        rt.store(h.id, rt.backend.upload(buf, h.dtype))
    rt.sync()
