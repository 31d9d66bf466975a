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


def run(cl: Cluster, kind: str, a: Any, b: Any, out: str | None) -> Any:
    """``a + b`` or ``a - b`` shard-wise; arrays are sharded like the sharded operand."""
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
        shape_a = a.shape if isinstance(a, Matrix) else hosts["a"].shape
        shape_b = b.shape if isinstance(b, Matrix) else hosts["b"].shape
        if shape_a != shape_b:
            raise InputError(f"{kind}: shapes differ: a is {shape_a}, b is {shape_b}")
        if isinstance(a, ShardedMatrix) and isinstance(b, ShardedMatrix) and a.plan != b.plan:
            raise InputError(f"{kind}: a and b must be sharded alike; a: axis {a.axis} "
                             f"counts {list(a.counts)}, b: axis {b.axis} counts {list(b.counts)}")
        plan = ref.plan if ref is not None else Plan.from_weights(shape_a[0], cl.weights, 0)
        placed = {}
        for arg, host in hosts.items():
            placed[arg] = cl._shard_host(host, plan)
            temporary.append(placed[arg])
        ma, mb = placed.get("a", a), placed.get("b", b)
        out_dtype = promote(ma.dtype, mb.dtype)
        result_kind = "torch" if "torch" in (ma.kind, mb.kind) else "numpy"
        keep_id = cl._new_id() if keep else None
        result = cl._run({"op": "elementwise", "kind": kind, "a": ma.id, "b": mb.id,
                          "shape": shape_a, "axis": plan.axis, "counts": plan.counts,
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

