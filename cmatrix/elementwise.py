"""Shard-wise add and sub on the driver (the ranks' half is the elementwise command)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import sinks
from .arrays import check_matrix, from_user, to_user
from .dtypes import promote
from .errors import InputError
from .matrix import Matrix, ReplicatedMatrix, ShardedMatrix
from .plan import Plan

if TYPE_CHECKING:
    from .cluster import Cluster


def _op_plan(x: ShardedMatrix, transpose: bool) -> Plan:
    """How op(x) is split: transposing a block swaps the axis it was cut along."""
    return Plan(1 - x.axis, x.counts) if transpose else x.plan


def run(cl: Cluster, kind: str, a: Any, b: Any, out: str | None, transpose_a: bool = False,
        transpose_b: bool = False) -> Any:
    """``op(a) + op(b)`` or ``op(a) - op(b)`` shard-wise (op transposes when its flag is
    set); arrays are sharded like the sharded operand. The result is split like op(a)."""
    flags = {"a": bool(transpose_a), "b": bool(transpose_b)}
    sink = sinks.parse(out)
    keep = sink.keep
    temporary: list[Matrix] = []
    try:
        for arg, x in (("a", a), ("b", b)):
            if isinstance(x, ReplicatedMatrix):
                raise InputError(f"{arg}: {kind} works shard-wise; pass a sharded matrix or an array")
            if isinstance(x, ShardedMatrix):
                cl._check_live(x, arg)
                if x.quant:
                    raise InputError(f"{arg}: {kind} of a quantised matrix; quantised weights are "
                                     "for matmul only")
        ref = a if isinstance(a, ShardedMatrix) else b if isinstance(b, ShardedMatrix) else None
        hosts = {arg: from_user(x, arg) for arg, x in (("a", a), ("b", b))
                 if not isinstance(x, Matrix)}
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
        ref_arg = "a" if ref is a else "b"
        plan = _op_plan(ref, flags[ref_arg]) if ref is not None else \
            Plan.from_weights(shape_a[0], cl.weights, 0)
        placed = {}
        for arg, host in hosts.items():  # cut the array so that op(block) lines up with plan
            placed[arg] = cl._shard_host(host, Plan(1 - plan.axis, plan.counts) if flags[arg] else plan)
            temporary.append(placed[arg])
        ma, mb = placed.get("a", a), placed.get("b", b)
        out_dtype = promote(ma.dtype, mb.dtype)
        result_kind = "torch" if "torch" in (ma.kind, mb.kind) else "numpy"
        keep_id = cl._new_id() if keep else None
        result = cl._run({"op": "elementwise", "kind": kind, "a": ma.id, "b": mb.id,
                          "shape": shape_a, "axis": plan.axis, "counts": plan.counts,
                          "transpose_a": flags["a"], "transpose_b": flags["b"],
                          "out_dtype": out_dtype, "keep_id": keep_id})
        if keep:
            return ShardedMatrix(cl, keep_id, shape_a, out_dtype, plan, None, result_kind)
        if sink.is_file:
            attrs = sinks.describe(kind, {"a": (getattr(a, "name", None), shape_a),
                                          "b": (getattr(b, "name", None), shape_b)},
                                   out_dtype, plan.axis, plan.counts)
            return sinks.deliver(sink, result, out_dtype, attrs, "elementwise")
        return to_user(result, out_dtype, result_kind)
    finally:
        for t in temporary:
            t.free()

