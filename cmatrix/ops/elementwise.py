"""Shard-wise ``op(a) + op(b)`` and ``op(a) - op(b)``: both halves.

Both operands are split alike (an array is sharded like the sharded operand on the
fly); each rank adds or subtracts its blocks, the result is split like op(a).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.arrays import check_matrix
from ..core.dtypes import empty, promote
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
    keep,
    result_kind,
)
from .placement import shard_host


@dataclass(frozen=True)
class Elementwise(Header, op="elementwise"):
    kind: str                   # "add" or "sub"
    a: int
    b: int
    shape: tuple[int, int]      # op(a)'s
    axis: int                   # op(a)'s split
    counts: tuple[int, ...]
    transpose_a: bool
    transpose_b: bool
    out_dtype: str
    keep_id: int | None

    CREATES = ("keep_id",)


class ElementwiseMethods:
    """``Cluster.add`` and ``Cluster.sub``; the one hook used is ``driver``."""

    driver: Driver

    def add(self, a: Any, b: Any, out: str | None = None, transpose_a: bool = False,
            transpose_b: bool = False) -> Any:
        """``op(a) + op(b)`` shard-wise (op transposes when its flag is set; op(a) and
        op(b) sharded alike; arrays are sharded on the fly)."""
        return elementwise(self.driver, "add", a, b, out, transpose_a, transpose_b)

    def sub(self, a: Any, b: Any, out: str | None = None, transpose_a: bool = False,
            transpose_b: bool = False) -> Any:
        """``op(a) - op(b)`` shard-wise, like :meth:`add`."""
        return elementwise(self.driver, "sub", a, b, out, transpose_a, transpose_b)


def _op_plan(x: ShardedMatrix, transpose: bool) -> Plan:
    """How op(x) is split: transposing a block swaps the axis it was cut along."""
    return Plan(1 - x.axis, x.counts) if transpose else x.plan


def elementwise(d: Driver, kind: str, a: Any, b: Any, out: str | None, transpose_a: bool = False,
                transpose_b: bool = False) -> Any:
    """``op(a) + op(b)`` or ``op(a) - op(b)`` shard-wise (op transposes when its flag is
    set); arrays are sharded like the sharded operand. The result is split like op(a)."""
    flags = {"a": bool(transpose_a), "b": bool(transpose_b)}
    sink = sinks.parse(out)
    temporary: list[Matrix] = []
    try:
        for arg, x in (("a", a), ("b", b)):
            if isinstance(x, ReplicatedMatrix):
                raise InputError(f"{arg}: {kind} works shard-wise; pass a sharded matrix or an array")
            if isinstance(x, ShardedMatrix):
                check_live(d, x, arg)
                if x.quant:
                    raise InputError(f"{arg}: {kind} of a quantised matrix; quantised weights are "
                                     "for matmul only")
        ref = a if isinstance(a, ShardedMatrix) else b if isinstance(b, ShardedMatrix) else None
        hosts = {arg: from_user(x, arg) for arg, x in (("a", a), ("b", b)) if not isinstance(x, Matrix)}
        for arg, host in hosts.items():
            check_matrix(host, arg)
        shapes = {arg: (x.shape if isinstance(x, Matrix) else hosts[arg].shape)
                  for arg, x in (("a", a), ("b", b))}
        shape_a, shape_b = (tuple(shapes[arg][::-1] if flags[arg] else shapes[arg]) for arg in "ab")
        if shape_a != shape_b:
            raise InputError(f"{kind}: shapes differ: op(a) is {shape_a} (transpose_a={flags['a']}), "
                             f"op(b) is {shape_b} (transpose_b={flags['b']})")
        if isinstance(a, ShardedMatrix) and isinstance(b, ShardedMatrix) and \
                _op_plan(a, flags["a"]) != _op_plan(b, flags["b"]):
            pa, pb = _op_plan(a, flags["a"]), _op_plan(b, flags["b"])
            raise InputError(f"{kind}: op(a) and op(b) must be sharded alike; op(a): axis {pa.axis} "
                             f"counts {list(pa.counts)}, op(b): axis {pb.axis} counts {list(pb.counts)}")
        check_room(sink, shape_a, promote(*(x.dtype if isinstance(x, Matrix) else hosts[g].dtype
                                           for g, x in (("a", a), ("b", b)))))
        ref_arg = "a" if ref is a else "b"
        plan = _op_plan(ref, flags[ref_arg]) if ref is not None else \
            Plan.from_weights(shape_a[0], d.weights, 0)
        placed = {}
        for arg, host in hosts.items():  # cut the array so that op(block) lines up with plan
            placed[arg] = shard_host(d, host, Plan(1 - plan.axis, plan.counts) if flags[arg] else plan)
            temporary.append(placed[arg])
        ma, mb = placed.get("a", a), placed.get("b", b)
        out_dtype = promote(ma.dtype, mb.dtype)
        kind_out = result_kind(ma.kind, mb.kind)
        keep_id = d.new_id() if sink.keep else None
        result = d.run(Elementwise(kind, ma.id, mb.id, shape_a, plan.axis, plan.counts, flags["a"],
                                   flags["b"], out_dtype, keep_id))
        if sink.keep:
            return ShardedMatrix(d, keep_id, shape_a, out_dtype, plan, None, kind_out)
        attrs = sinks.describe(kind, {"a": (getattr(a, "name", None), shape_a),
                                      "b": (getattr(b, "name", None), shape_b)},
                               out_dtype, plan.axis, plan.counts)
        return deliver(sink, "elementwise", result, out_dtype, kind_out, attrs)
    finally:
        for t in temporary:
            t.free()


@on_ranks(Elementwise)
def _elementwise(rt: Runtime, h: Elementwise, _: Any) -> np.ndarray | None:
    kept = h.keep_id is not None
    with rt.step("compute"):
        fn = rt.backend.add if h.kind == "add" else rt.backend.sub
        a, b = rt.block(h.a), rt.block(h.b)
        # Transposed operands: a resident transposed copy for this call only.
        a_t = rt.backend.transpose(a) if h.transpose_a else a
        b_t = rt.backend.transpose(b) if h.transpose_b else b
        y = fn(a_t, b_t)
        for t, orig in ((a_t, a), (b_t, b)):
            if t is not orig:
                rt.backend.free(t)
        if kept:
            keep(rt, h.keep_id, y, h.out_dtype)
        else:
            part = rt.backend.download(y, h.out_dtype)
            full = empty(h.shape, h.out_dtype) if rt.comm.is_driver else None
    rt.sync()
    if kept:
        return None
    rt.comm.gather_blocks(part, full, Plan(h.axis, h.counts))
    return full
