"""Rank half of the node-side operations (see :mod:`cmatrix.nodeops`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .ops import _empty, _keep
from .plan import Plan
from .runtime import Runtime, command


@command("nodeop")
def nodeop(rt: Runtime, h: dict, _: Any) -> np.ndarray | None:
    """One operand in, one result out; softmax and RMSNorm along the split axis
    of a sharded operand combine one statistic per row/column across ranks."""
    dev, comm, fn, axis = rt.backend, rt.comm, h["fn"], h["axis"]
    sharded = h["plan_axis"] is not None
    across = sharded and axis is not None and axis == h["plan_axis"]  # statistics need all ranks
    # A replicated operand is computed by every rank (each holds it), so every rank
    # takes the same steps; only the driver keeps a result that is not kept resident.
    y = stat = None
    with rt.step("compute"):
        x = rt.block(h["x"])
        if fn == "activation":
            y = dev.activation(x, h["kind"])
        elif fn == "rope":
            y = _rope(rt, h, x)
        elif fn == "repeat_kv":
            y = dev.repeat_kv(x, h["head_dim"], h["n_rep"])
        elif fn == "softmax":
            stat = dev.row_reduce(x, "max", axis)
        elif fn == "rms_norm":
            stat = dev.row_reduce(x, "sumsq", axis)
        else:
            raise ValueError(f"unknown node op {fn!r}")
    rt.sync()
    if fn == "softmax":
        if across:
            comm.allreduce(stat, "max")
        with rt.step("compute"):
            shift = np.where(np.isfinite(stat), stat, 0).astype(np.float32)  # all -inf: no shift
            total = dev.row_reduce(x, "sumexp", axis, shift)
        rt.sync()
        if across:
            comm.allreduce(total, "sum")
        with rt.step("compute"):
            y = dev.softmax_finish(x, shift, total, axis)
        rt.sync()
    elif fn == "rms_norm":
        if across:
            comm.allreduce(stat, "sum")
        with rt.step("compute"):
            mean_square = (stat / h["shape"][axis]).astype(np.float32)
            weight = h["weight"]
            if weight is not None and across:
                weight = weight[Plan(axis, tuple(h["counts"])).block(comm.rank)]
            y = dev.rms_finish(x, mean_square, weight, h["eps"], axis)
        rt.sync()
    return _emit(rt, h, y)


def _rope(rt: Runtime, h: dict, x: Any) -> Any:
    positions = h["positions"]
    if h["plan_axis"] == 0:
        positions = positions[Plan(0, tuple(h["counts"])).block(rt.comm.rank)]
    angles = positions.astype(np.float64)[:, None] * h["inv_freq"].astype(np.float64)[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return rt.backend.rope(x, cos, sin, h["head_dim"], h["interleaved"])


@command("attention")
def attention(rt: Runtime, h: dict, mask: np.ndarray | None) -> np.ndarray | None:
    """Each rank attends with its own heads; the (small) mask is broadcast."""
    with rt.step("prepare"):
        if h["mask_shape"] is not None and not rt.comm.is_driver:
            mask = np.empty(h["mask_shape"], dtype=np.float32)
    rt.sync()
    if h["mask_shape"] is not None:
        rt.comm.bcast(mask)
    with rt.step("compute"):
        q, k, v = (rt.block(h[n]) for n in ("q", "k", "v"))
        y = rt.backend.attention(q, k, v, h["head_dim"], h["scale"], mask, h["causal"])
    rt.sync()
    return _emit(rt, h, y)


def _emit(rt: Runtime, h: dict, y: Any) -> np.ndarray | None:
    """Keep ``y`` resident (rounded to the result dtype) or bring it to the driver."""
    comm, dtype = rt.comm, h["dtype"]
    sharded = h["plan_axis"] is not None
    part = full = None
    with rt.step("store"):
        if h["keep_id"] is not None:
            _keep(rt, h["keep_id"], y, dtype)
        elif sharded or comm.is_driver:
            part = rt.backend.download(y, dtype)
            if sharded and comm.is_driver:
                full = _empty(h["out_shape"], dtype)
    rt.sync()
    if h["keep_id"] is not None:
        return None
    if not sharded:
        return part if comm.is_driver else None
    comm.gather_blocks(part, full, Plan(h["plan_axis"], tuple(h["out_counts"])))
    return full
