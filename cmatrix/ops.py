"""Command handlers run on every rank. The driver validated the header before
sending it; ``payload`` is the driver's own data (None on workers)."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from . import __version__, backends, ops_cache
from .backends.device import Device
from .dtypes import STORAGE, from_float32
from .errors import CMatrixError
from .plan import Plan
from .runtime import Runtime, command, default_threads


def _empty(shape, dtype: str) -> np.ndarray:
    return np.empty(tuple(shape), dtype=STORAGE[dtype])


@command("configure")
def configure(rt: Runtime, h: dict, _: Any) -> list[dict] | None:
    comm = rt.comm
    with rt.step("setup"):
        name = h["backends"][comm.rank]
        rt.backend_name = name
        if h["version"] != __version__:
            raise CMatrixError(f"cmatrix version differs: driver has {h['version']}, "
                               f"this rank has {__version__}")
        threads = h["threads"] or default_threads(comm.local_size)
        accel = h["accel"][comm.rank]
        backend = backends.create(name, device_index=_device_index(comm, h) if accel else 0,
                                  threads=threads, accel=accel)
        rt.models.clear()
        for ident in list(rt.blocks):
            rt.free(ident)
        rt.backend = Device(backend)
        from .comm import library_version

        info = {
            "rank": comm.rank, "host": comm.host, "local_rank": comm.local_rank,
            "local_size": comm.local_size, "backend": name, "threads": threads,
            "versions": {"cmatrix": __version__, "numpy": np.__version__,
                         "python": platform.python_version(), "mpi": library_version()},
            **rt.backend.describe(),
        }
    rt.sync()
    return comm.gather_objects(info)


def _device_index(comm, h: dict, name: str | None = None) -> int:
    """Ranks of one host that chose the same backend with accel take its devices 0, 1, ...

    ``name``: the index this rank would get on that backend instead of its own.
    """
    name = name or h["backends"][comm.rank]
    before = comm.local_peers[: comm.local_rank]
    return sum(1 for r in before if h["backends"][r] == name and h["accel"][r])


@command("probe")
def probe(rt: Runtime, h: dict, _: Any) -> list[dict] | None:
    """Every rank tries every backend (for ``cmatrix doctor``)."""
    comm = rt.comm
    with rt.step("probe"):
        threads = h["threads"] or default_threads(comm.local_size)
        if h.get("backends"):  # the index this rank would take on each backend, given the others
            index = {name: _device_index(comm, h, name) for name in backends.available()}
        else:  # no configuration: as if every rank of the host chose that backend
            index = dict.fromkeys(backends.available(), comm.local_rank)
        report = {"rank": comm.rank, "host": comm.host, "backends": backends.probe_all(index, threads)}
    rt.sync()
    return rt.comm.gather_objects(report)


@command("identify")
def identify(rt: Runtime, h: dict, _: Any) -> list[dict] | None:
    """Every rank's host name and addresses (for matching a seed-style node_IP_list).

    Runs before ``configure`` is needed: it touches no backend."""
    from .hostaddr import local_identity

    with rt.step("identify"):
        me = {"rank": rt.comm.rank, "host": rt.comm.host, "addresses": local_identity(rt.comm.host)}
    rt.sync()
    return rt.comm.gather_objects(me)


@command("shard")
def shard(rt: Runtime, h: dict, full: np.ndarray | None) -> list[dict] | None:
    """Each rank's block of the driver's ``full``, kept resident.

    With ``h["cache"]``: ranks marked in ``reuse`` take the shard that
    cache_check found (in memory or read from disk) and nothing is sent to
    them; the others receive theirs and, with ``save``, write it to disk.
    Returns every rank's cache header (None without a cache).
    """
    plan = Plan(h["axis"], tuple(h["counts"]))
    quant, quant_axis = h.get("quant"), h.get("quant_axis", 0)
    c = h.get("cache")
    rank = rt.comm.rank
    reuse = tuple(c["reuse"]) if c else (False,) * rt.comm.size
    block = reused = None
    with rt.step("prepare"):
        shape = plan.block_shape(h["shape"], rank)
        if reuse[rank]:
            reused = ops_cache.take_reused(rt, c["name"])
        else:
            rows = shape if quant_axis == 1 else shape[::-1]  # quantised rows run along quant_axis
            if not rt.backend.supports("matmul", quant or h["dtype"], rows):
                raise CMatrixError(f"{rt.backend.name} on {rt.backend.device} cannot hold a "
                                   f"{quant or h['dtype']} block of shape {shape}")
            block = _empty(shape, h["dtype"])
    rt.sync()
    if not all(reuse):
        _scatter_in_bands(rt, h, full, block, plan, reuse)
    with rt.step("upload"):
        if reused and reused[0] == "memory":
            rt.alias(h["id"], reused[1])
        else:
            if reused:
                block = reused[1]
            rt.store(h["id"], rt.backend.upload(block, h["dtype"], quant, quant_axis))
    rt.sync()
    if not c:
        return None
    with rt.step("save"):
        meta = ops_cache.save_and_register(rt, h, block, reused[2] if reused else None)
    rt.sync()
    return rt.comm.gather_objects(meta)


#: a transfer this large goes in bands, so the driver can show progress
BAND_BYTES = 64 << 20


def band_count(shape: tuple[int, int], dtype: str, plan: Plan) -> int:
    """How many bands the driver sends a matrix in (it puts the number in the header)."""
    rows, cols = shape
    most = rows if plan.axis == 1 else max(max(plan.counts), 1)
    return int(max(1, min(most, -(-rows * cols * STORAGE[dtype].itemsize // BAND_BYTES))))


def _scatter_in_bands(rt: Runtime, h: dict, full: np.ndarray | None, block: np.ndarray | None,
                      plan: Plan, skip: tuple[bool, ...]) -> None:
    """scatter_blocks in bands of about BAND_BYTES, with a progress bar on the driver.

    The driver chose the number of bands (``h["bands"]``). Column blocks (axis 1)
    are cut into bands of whole rows; row blocks (axis 0) into equal fractions
    of each rank's rows. A skipped rank takes part with an empty block.
    """
    comm, rank = rt.comm, rt.comm.rank
    rows, cols = h["shape"]
    itemsize = STORAGE[h["dtype"]].itemsize
    if block is None:  # reused here: an empty stand-in with the block's other dimension
        dummy = list(plan.block_shape(h["shape"], rank))
        dummy[plan.axis] = 0
        block = _empty(dummy, h["dtype"])
    bands = h.get("bands", 1)
    active = [0 if s else c for c, s in zip(plan.counts, skip, strict=True)]
    sent = sum(active) * (cols if plan.axis == 0 else rows)
    with rt.progress(sent * itemsize, f"send {h.get('name') or 'matrix'}") as bar:
        if bands == 1:
            comm.scatter_blocks(full, block, plan, skip)
            bar.update(sent * itemsize)
            return
        for k in range(bands):
            if plan.axis == 1:
                lo, hi = k * rows // bands, (k + 1) * rows // bands
                comm.scatter_blocks(None if full is None else full[lo:hi], block[lo:hi], plan, skip)
                bar.update((hi - lo) * sum(active) * itemsize)
                continue
            los = [k * c // bands for c in plan.counts]
            his = [(k + 1) * c // bands for c in plan.counts]
            counts = [min(a, hi - lo) for a, lo, hi in zip(active, los, his, strict=True)]
            displs = [d + lo for d, lo in zip(plan.displs, los, strict=True)]
            comm.scatter_rows(full, block[los[rank] : los[rank] + counts[rank]], counts, displs)
            bar.update(sum(counts) * cols * itemsize)


@command("replicate")
def replicate(rt: Runtime, h: dict, full: np.ndarray | None) -> None:
    with rt.step("prepare"):
        # The driver keeps its own copy: the caller may change its array later.
        buf = full.copy() if rt.comm.is_driver else _empty(h["shape"], h["dtype"])
    rt.sync()
    rt.comm.bcast(buf)
    with rt.step("upload"):
        rt.store(h["id"], rt.backend.upload(buf, h["dtype"]))
    rt.sync()


@command("matmul")
def matmul(rt: Runtime, h: dict, a_full: np.ndarray | None) -> np.ndarray | None:
    """op(a) @ op(b) with b sharded.

    mode "output": b is split along op(b)'s columns; every rank needs all of
    op(a) and computes its columns of the result, gathered in column order.
    mode "contraction": b is split along the inner dimension; rank r gets the
    matching slice of op(a) and the float32 partial products are summed.
    """
    comm, rank = rt.comm, rt.comm.rank
    plan = Plan(h["b_axis"], tuple(h["counts"]))
    a_plan = Plan(h["a_axis"], plan.counts) if h["a_src"] == "scatter" else None
    with rt.step("prepare"):
        b_block = rt.block(h["b"])
        a_buf = None
        if h["a_src"] == "bcast":
            a_buf = a_full if comm.is_driver else _empty(h["a_shape"], h["a_dtype"])
        elif h["a_src"] == "scatter":
            a_buf = _empty(a_plan.block_shape(h["a_shape"], rank), h["a_dtype"])
    rt.sync()
    if h["a_src"] == "bcast":
        comm.bcast(a_buf)
    elif h["a_src"] == "scatter":
        comm.scatter_blocks(a_full, a_buf, a_plan)
    output_mode = h["mode"] == "output"
    keep = h["keep_id"] is not None
    rows = Plan(0, tuple(h["row_counts"])) if keep and not output_mode else None
    full = None
    with rt.step("compute"):
        resident = h["a_src"] == "resident"
        a_res = rt.block(h["a_id"]) if resident else rt.backend.upload(a_buf, h["a_dtype"])
        y = rt.backend.matmul(a_res, b_block, h["transpose_a"], h["transpose_b"], partial=not output_mode)
        if output_mode and keep:
            _keep(rt, h["keep_id"], y, h["out_dtype"])
        elif output_mode:
            part = rt.backend.download(y, h["out_dtype"])
            full = _empty(h["out_shape"], h["out_dtype"]) if comm.is_driver else None
        else:
            part = rt.backend.download(y, "float32")
            if keep:
                full = np.empty(rows.block_shape(h["out_shape"], rank), dtype=np.float32)
            elif comm.is_driver:
                full = np.empty(h["out_shape"], dtype=np.float32)
    rt.sync()
    if output_mode:
        if not keep:
            comm.gather_blocks(part, full, Plan(1, plan.counts))
        return full
    if keep:
        comm.reduce_scatter_rows(part, full, rows)
        with rt.step("store"):
            narrowed = from_float32(full, h["out_dtype"])
            rt.store(h["keep_id"], rt.backend.upload(narrowed, h["out_dtype"]))
        rt.sync()
        return None
    comm.reduce_sum(part, full)
    return from_float32(full, h["out_dtype"]) if comm.is_driver else None


def _keep(rt: Runtime, ident: int, y: Any, dtype: str) -> None:
    """Keep a result resident, rounded to its declared dtype like a gathered one."""
    if dtype != "float32":
        y = rt.backend.upload(rt.backend.download(y, dtype), dtype)
    rt.store(ident, y)


@command("elementwise")
def elementwise(rt: Runtime, h: dict, _: Any) -> np.ndarray | None:
    keep = h["keep_id"] is not None
    with rt.step("compute"):
        fn = rt.backend.add if h["kind"] == "add" else rt.backend.sub
        a, b = rt.block(h["a"]), rt.block(h["b"])
        # Transposed operands: a resident transposed copy for this call only.
        a_t = rt.backend.transpose(a) if h.get("transpose_a") else a
        b_t = rt.backend.transpose(b) if h.get("transpose_b") else b
        y = fn(a_t, b_t)
        for t, orig in ((a_t, a), (b_t, b)):
            if t is not orig:
                rt.backend.free(t)
        if keep:
            _keep(rt, h["keep_id"], y, h["out_dtype"])
        else:
            part = rt.backend.download(y, h["out_dtype"])
            full = _empty(h["shape"], h["out_dtype"]) if rt.comm.is_driver else None
    rt.sync()
    if keep:
        return None
    rt.comm.gather_blocks(part, full, Plan(h["axis"], tuple(h["counts"])))
    return full


@command("gather")
def gather(rt: Runtime, h: dict, _: Any) -> np.ndarray | None:
    with rt.step("download"):
        part = rt.backend.download(rt.block(h["id"]), h["dtype"])
        full = _empty(h["shape"], h["dtype"]) if rt.comm.is_driver else None
    rt.sync()
    rt.comm.gather_blocks(part, full, Plan(h["axis"], tuple(h["counts"])))
    return full


@command("free")
def free(rt: Runtime, h: dict, _: Any) -> None:
    for ident in h["ids"]:
        rt.free(ident)
