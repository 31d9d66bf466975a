"""Matmul, ``op(a) @ op(b)`` with ``b`` sharded: both halves.

Mode "output": b is split along op(b)'s columns; every rank gets all of op(a)
(``Bcast``) and computes its columns of the result, gathered in column order.
Mode "contraction": b is split along the inner dimension; rank r gets the matching
slice of op(a) (``Scatterv``) and the float32 partial products are summed (``Reduce``).
An ``a`` already resident in the right layout is not sent at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..core.arrays import check_matrix
from ..core.checks import check_inner
from ..core.dtypes import empty, from_float32, promote
from ..core.plan import Plan
from ..engine.driver import Driver
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import InputError
from ..io import sinks
from ..io.store import from_user
from .handles import (
    Matrix,
    ReplicatedMatrix,
    ShardedMatrix,
    check_live,
    check_room,
    deliver,
    gather,
    keep,
    result_kind,
)
from .placement import shard_host


@dataclass(frozen=True)
class Matmul(Header, op="matmul"):
    mode: str                       # "output" or "contraction"
    b: int                          # the resident b
    b_axis: int
    counts: tuple[int, ...]         # b's split
    transpose_a: bool
    transpose_b: bool
    a_src: str                      # "bcast", "scatter" or "resident"
    a_id: int | None                # a resident a
    a_shape: tuple[int, int]
    a_dtype: str | None             # a sent by the driver
    a_axis: int | None              # the axis of a that is scattered
    out_shape: tuple[int, int]
    out_dtype: str
    keep_id: int | None             # the result stays on the ranks under this id
    row_counts: tuple[int, ...] | None  # a kept contraction result: rows per rank

    CREATES = ("keep_id",)


class _PlacedA(NamedTuple):
    """How op(a) reaches the ranks, decided on the driver."""

    payload: np.ndarray | None
    lead: tuple[int, ...]  # the result's leading dimensions (a's rows, or its stacked shape)
    kind: str
    dtype: str
    transpose: bool
    src: str
    ident: int | None
    shape: tuple[int, int]
    axis: int | None


class MatmulMethods:
    """``Cluster.matmul``; the one hook used is ``driver``."""

    driver: Driver

    def matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
               out: str | None = None) -> Any:
        """``op(a) @ op(b)`` where ``op`` transposes when its flag is set.

        ``b`` is a :class:`ShardedMatrix` (an array is sharded on the fly along
        op(b)'s columns). If b is split along op(b)'s columns every rank computes
        its columns of the result; if it is split along the inner dimension every
        rank multiplies the matching slice of op(a) and the partial products are
        summed. ``a`` may be an array, a :class:`ReplicatedMatrix`, or a
        ShardedMatrix split like b's inner dimension (nothing is sent then).
        ``a`` with more than two dimensions is treated as a stack of rows.
        ``out=None`` returns the result on the driver; ``out="keep"`` leaves it
        distributed and returns a ShardedMatrix; "h5:..."/"shm:..." write a file.
        """
        return matmul(self.driver, a, b, transpose_a, transpose_b, out)


def matmul(d: Driver, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
           out: str | None = None) -> Any:
    """The driver's half of :meth:`MatmulMethods.matmul`."""
    sink = sinks.parse(out)
    transpose_a, transpose_b = bool(transpose_a), bool(transpose_b)
    host_b = None
    if isinstance(b, ShardedMatrix):
        check_live(d, b, "b")
        b_shape, b_plan, b_dtype, b_kind = b.shape, b.plan, b.dtype, b.kind
        if b.quant and transpose_b != (b.quant_axis == 1):
            raise InputError(f"b: {b.quant} blocks run along axis {b.quant_axis}, so the matmul must "
                             f"contract that axis: pass transpose_b={b.quant_axis == 1}")
    elif isinstance(b, Matrix):
        raise InputError("b: must be sharded (cl.shard(b)); a replicated b leaves nothing to split")
    else:  # an array: shard it along op(b)'s columns for this call only
        host_b = from_user(b, "b")
        check_matrix(host_b, "b")
        axis = 0 if transpose_b else 1
        b_shape, b_dtype, b_kind = host_b.shape, host_b.dtype, host_b.kind
        b_plan = Plan.from_weights(b_shape[axis], d.weights, axis)
    k_b, n = (b_shape[1], b_shape[0]) if transpose_b else b_shape
    b_op_axis = 1 - b_plan.axis if transpose_b else b_plan.axis
    mode = "output" if b_op_axis == 1 else "contraction"
    a_at = _place_a(d, a, b_plan, mode, transpose_a, transpose_b, (k_b, n))
    m = a_at.shape[1] if a_at.transpose else a_at.shape[0]
    out_dtype = promote(a_at.dtype, b_dtype)
    kind = result_kind(a_at.kind, b_kind)
    check_room(sink, (*a_at.lead, n), out_dtype)
    keep_id = d.new_id() if sink.keep else None
    row_counts = Plan.from_weights(m, d.weights, 0).counts if sink.keep and mode == "contraction" else None
    temporary = shard_host(d, host_b, b_plan) if host_b is not None else None
    try:
        header = Matmul(mode, (temporary or b).id, b_plan.axis, b_plan.counts, a_at.transpose, transpose_b,
                        a_at.src, a_at.ident, a_at.shape, a_at.dtype if a_at.src != "resident" else None,
                        a_at.axis, (m, n), out_dtype, keep_id, row_counts)
        result = d.run(header, a_at.payload)
    finally:
        if temporary is not None:
            temporary.free()
    if sink.keep:
        plan = Plan(1, b_plan.counts) if mode == "output" else Plan(0, row_counts)
        return ShardedMatrix(d, keep_id, (m, n), out_dtype, plan, None, kind)
    attrs = None
    if sink.is_file:
        attrs = sinks.describe("matmul", {"a": (getattr(a, "name", None), a_at.shape),
                                          "b": (getattr(b, "name", None), b_shape)},
                               out_dtype, b_plan.axis, b_plan.counts)
        attrs.update(transpose_a=a_at.transpose, transpose_b=transpose_b)
    return deliver(sink, "matmul", result.reshape(*a_at.lead, n), out_dtype, kind, attrs)


def _place_a(d: Driver, a: Any, b_plan: Plan, mode: str, transpose_a: bool, transpose_b: bool,
             op_b_shape: tuple[int, int]) -> _PlacedA:
    """Validate op(a) against op(b) and decide how it reaches the ranks."""
    if isinstance(a, Matrix):
        check_live(d, a, "a")
        if getattr(a, "quant", None):
            raise InputError("a: a quantised matrix can only be the weight b of a matmul")
        check_inner(a.shape, transpose_a, op_b_shape, transpose_b)
        a_axis = 0 if transpose_a else 1  # a's stored axis that op(a) contracts over
        if (mode == "contraction" and isinstance(a, ShardedMatrix) and a.axis == a_axis
                and a.counts == b_plan.counts) or (mode == "output" and isinstance(a, ReplicatedMatrix)):
            lead = (a.shape[1] if transpose_a else a.shape[0],)
            return _PlacedA(None, lead, a.kind, a.dtype, transpose_a, "resident", a.id, a.shape, None)
        a = gather(d, a)  # comes back as numpy or torch, like its source
    host = from_user(a, "a")
    data = host.data
    if data.ndim == 0 or 0 in data.shape:
        raise InputError(f"a: expected a non-empty matrix or vector, got shape {host.shape}")
    if data.ndim != 2 and transpose_a:
        raise InputError(f"a: transpose_a needs a 2-D a, got shape {host.shape}")
    if data.ndim == 1:
        lead: tuple[int, ...] = ()
        data = data.reshape(1, -1)
    elif data.ndim > 2:
        lead = data.shape[:-1]
        data = data.reshape(-1, data.shape[-1])
    else:
        lead = (data.shape[1] if transpose_a else data.shape[0],)
        if not data.flags.c_contiguous and data.T.flags.c_contiguous:
            data, transpose_a = data.T, not transpose_a  # a transposed view: flip the flag
    data = np.ascontiguousarray(data)
    d.check_dtype(host.dtype)
    check_inner(data.shape, transpose_a, op_b_shape, transpose_b)
    src = "bcast" if mode == "output" else "scatter"
    axis = (0 if transpose_a else 1) if src == "scatter" else None
    return _PlacedA(data, lead, host.kind, host.dtype, transpose_a, src, None, data.shape, axis)


@on_ranks(Matmul)
def _matmul(rt: Runtime, h: Matmul, a_full: np.ndarray | None) -> np.ndarray | None:
    comm, rank = rt.comm, rt.comm.rank
    plan = Plan(h.b_axis, h.counts)
    a_plan = Plan(h.a_axis, plan.counts) if h.a_src == "scatter" else None
    with rt.step("prepare"):
        b_block = rt.block(h.b)
        a_buf = None
        if h.a_src == "bcast":
            a_buf = a_full if comm.is_driver else empty(h.a_shape, h.a_dtype)
        elif h.a_src == "scatter":
            a_buf = empty(a_plan.block_shape(h.a_shape, rank), h.a_dtype)
    rt.sync()
    if h.a_src == "bcast":
        comm.bcast(a_buf)
    elif h.a_src == "scatter":
        comm.scatter_blocks(a_full, a_buf, a_plan)
    output_mode = h.mode == "output"
    kept = h.keep_id is not None
    rows = Plan(0, h.row_counts) if kept and not output_mode else None
    full = None
    with rt.step("compute"):
        a_res = rt.block(h.a_id) if h.a_src == "resident" else rt.backend.upload(a_buf, h.a_dtype)
        y = rt.backend.matmul(a_res, b_block, h.transpose_a, h.transpose_b, partial=not output_mode)
        if output_mode and kept:
            keep(rt, h.keep_id, y, h.out_dtype)
        elif output_mode:
            part = rt.backend.download(y, h.out_dtype)
            full = empty(h.out_shape, h.out_dtype) if comm.is_driver else None
        else:
            part = rt.backend.download(y, "float32")
            if kept:
                full = np.empty(rows.block_shape(h.out_shape, rank), dtype=np.float32)
            elif comm.is_driver:
                full = np.empty(h.out_shape, dtype=np.float32)
    rt.sync()
    if output_mode:
        if not kept:
            comm.gather_blocks(part, full, Plan(1, plan.counts))
        return full
    if kept:
        comm.reduce_scatter_rows(part, full, rows)
        with rt.step("store"):
            narrowed = from_float32(full, h.out_dtype)
            rt.store(h.keep_id, rt.backend.upload(narrowed, h.out_dtype))
        rt.sync()
        return None
    comm.reduce_sum(part, full)
    return from_float32(full, h.out_dtype) if comm.is_driver else None
