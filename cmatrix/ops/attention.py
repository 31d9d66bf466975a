"""Attention with heads split across ranks: both halves of ``Cluster.attention``.

Heads are apportioned in whole key/value groups: a rank holding key/value
heads g..g+n also holds the n * H/Hkv query heads that read them, so every
rank attends on its own and only the (small) mask travels besides q, k, v.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.arrays import check_matrix
from ..core.checks import positive_int
from ..core.dtypes import promote, to_float32
from ..core.plan import Plan, head_plans
from ..engine.driver import Driver
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import InputError
from ..io import sinks
from ..io.store import from_user
from .handles import Matrix, ShardedMatrix, check_live, check_room, deliver, kept, result_kind
from .nodeops import emit
from .placement import shard_host


@dataclass(frozen=True)
class Attention(Header, op="attention"):
    q: int
    k: int
    v: int
    head_dim: int
    scale: float
    causal: bool
    mask_shape: tuple[int, int] | None  # the mask travels as the driver's payload
    dtype: str
    out_counts: tuple[int, ...]         # q's columns per rank: the result is split like q
    out_shape: tuple[int, int]
    keep_id: int | None

    CREATES = ("keep_id",)


class AttentionMethods:
    """``Cluster.attention``; the one hook used is ``driver``."""

    driver: Driver

    def attention(self, q: Any, k: Any, v: Any, head_dim: int, scale: float | None = None,
                  mask: Any = None, causal: bool = False, weights: Sequence[float] | None = None,
                  out: str | None = None) -> Any:
        """Scaled dot-product attention with heads split across ranks.

        ``q`` is (Sq, H*head_dim), ``k`` and ``v`` are (Sk, Hkv*head_dim) with H a
        multiple of Hkv (grouped-query attention when larger). Arrays are split in
        whole key/value groups in proportion to ``weights`` (a rank may get none);
        sharded matrices must already be split that way (q by columns in groups of
        H/Hkv heads, k and v by columns in whole heads, the same groups per rank).
        ``scale`` defaults to 1/sqrt(head_dim); ``mask`` is an additive (Sq, Sk)
        float mask or a boolean one (True: may attend); ``causal`` lets query i see
        keys up to i + Sk - Sq (a decode step sees the whole cache). A query that
        sees no key gets zeros. The result is split like q.
        """
        return attention(self.driver, q, k, v, head_dim, scale, mask, causal, weights, out)


def attention(d: Driver, q: Any, k: Any, v: Any, head_dim: int, scale: float | None, mask: Any,
              causal: bool, weights: Sequence[float] | None, out: str | None) -> Any:
    """The driver's half of :meth:`AttentionMethods.attention`."""
    sink = sinks.parse(out)
    head_dim = positive_int(head_dim, "head_dim")
    operands = {"q": q, "k": k, "v": v}
    hosts = {}
    for arg, x in operands.items():
        if isinstance(x, Matrix):
            check_live(d, x, arg)
            if not isinstance(x, ShardedMatrix) or x.axis != 1 or x.quant:
                raise InputError(f"{arg}: a cluster matrix here must be sharded by columns (whole heads)")
        else:
            hosts[arg] = from_user(x, arg)
            check_matrix(hosts[arg], arg)
    shapes = {a: (x.shape if isinstance(x, Matrix) else hosts[a].shape) for a, x in operands.items()}
    sq, q_cols = shapes["q"]
    kv_heads, n_rep, scale, mask_data = check(shapes["q"], shapes["k"], shapes["v"], head_dim, scale, mask)
    q_plan, kv_plan = _plans(d, operands, head_dim, n_rep, kv_heads, weights)
    dtype = promote(*(x.dtype if isinstance(x, Matrix) else hosts[a].dtype for a, x in operands.items()))
    for host in hosts.values():
        d.check_dtype(host.dtype, q_plan.counts)
    kind = result_kind(*(x.kind if isinstance(x, Matrix) else hosts[a].kind for a, x in operands.items()))
    check_room(sink, (sq, q_cols), dtype)
    placed, temporary = dict(operands), []
    try:
        for arg, host in hosts.items():
            placed[arg] = shard_host(d, host, q_plan if arg == "q" else kv_plan)
            temporary.append(placed[arg])
        keep_id = d.new_id() if sink.keep else None
        header = Attention(placed["q"].id, placed["k"].id, placed["v"].id, head_dim, float(scale),
                           bool(causal), None if mask_data is None else mask_data.shape, dtype,
                           q_plan.counts, (sq, q_cols), keep_id)
        result = d.run(header, mask_data)
    finally:
        for t in temporary:
            t.free()
    if sink.keep:
        return kept(d, keep_id, (sq, q_cols), dtype, q_plan, kind)
    attrs = sinks.describe("attention", {"a": (getattr(q, "name", None), (sq, q_cols))}, dtype,
                           q_plan.axis, q_plan.counts)
    return deliver(sink, "attention", result, dtype, kind, attrs)


def check(q_shape: tuple[int, int], k_shape: tuple[int, int], v_shape: tuple[int, int],
          head_dim: int, scale: float | None, mask: Any) -> tuple[int, int, float, np.ndarray | None]:
    """Shapes, scale and mask checked before anything moves:
    (key/value heads, query heads per key/value head, scale, float32 mask or None)."""
    head_dim = positive_int(head_dim, "head_dim")
    (sq, q_cols), (sk, k_cols) = q_shape, k_shape
    if tuple(v_shape) != tuple(k_shape):
        raise InputError(f"v: must have k's shape {tuple(k_shape)}, got {tuple(v_shape)}")
    if q_cols % head_dim or k_cols % head_dim:
        raise InputError(f"head_dim: {head_dim} must divide q's {q_cols} and k's {k_cols} columns")
    heads, kv_heads = q_cols // head_dim, k_cols // head_dim
    if heads % kv_heads:
        raise InputError(f"q has {heads} heads, k and v {kv_heads}: the query heads must be a "
                         "multiple of the key/value heads")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise InputError(f"scale: a finite number, got {scale!r}")
    return kv_heads, heads // kv_heads, float(scale), _mask(mask, (sq, sk))


def _plans(d: Driver, operands: dict, head_dim: int, n_rep: int, kv_heads: int,
           weights: Sequence[float] | None) -> tuple[Plan, Plan]:
    """The head split: from the sharded operands when there are any, else from ``weights``."""
    q, k, v = operands["q"], operands["k"], operands["v"]
    if isinstance(k, ShardedMatrix):
        kv_plan = k.plan
    elif isinstance(v, ShardedMatrix):
        kv_plan = v.plan
    elif isinstance(q, ShardedMatrix):
        if any(c % (head_dim * n_rep) for c in q.counts):
            raise InputError(f"q: split by columns as {list(q.counts)}, not in whole groups of "
                             f"{n_rep} heads of {head_dim}")
        kv_plan = Plan(1, tuple(c // n_rep for c in q.counts))
    else:
        return head_plans(kv_heads, n_rep, head_dim, d.weights if weights is None else weights, d.size)
    if any(c % head_dim for c in kv_plan.counts):
        raise InputError(f"k/v: split by columns as {list(kv_plan.counts)}, not in whole heads of {head_dim}")
    q_plan = Plan(1, tuple(c * n_rep for c in kv_plan.counts))
    for arg, want in (("q", q_plan), ("k", kv_plan), ("v", kv_plan)):
        x = operands[arg]
        if isinstance(x, ShardedMatrix) and x.plan != want:
            raise InputError(f"{arg}: split by columns as {list(x.counts)}, but the head groups need "
                             f"{list(want.counts)} (q holds {n_rep} query heads per key/value head)")
    return q_plan, kv_plan


def _mask(mask: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """An additive float32 mask of ``shape`` (a boolean mask: True may attend)."""
    if mask is None:
        return None
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        data = np.where(mask, 0.0, -np.inf).astype(np.float32)
    elif isinstance(mask, np.ndarray) and mask.dtype.kind == "f":  # a mask of any float type
        data = np.ascontiguousarray(mask, dtype=np.float32)
    elif type(mask).__module__.split(".")[0] == "torch" and str(mask.dtype) == "torch.bool":
        data = np.where(mask.detach().cpu().numpy(), 0.0, -np.inf).astype(np.float32)
    else:
        host = from_user(mask, "mask")
        data = np.ascontiguousarray(to_float32(host.data, host.dtype), dtype=np.float32)
    if data.shape != shape:
        raise InputError(f"mask: expected shape {shape} (queries x keys), got {data.shape}")
    if np.isnan(data).any() or np.isposinf(data).any():
        raise InputError("mask: contains NaN or +inf; use 0 (attend) or -inf (do not attend)")
    return data


@on_ranks(Attention)
def _attention(rt: Runtime, h: Attention, mask: np.ndarray | None) -> np.ndarray | None:
    """Each rank attends with its own heads; the (small) mask is broadcast."""
    with rt.step("prepare"):
        if h.mask_shape is not None and not rt.comm.is_driver:
            mask = np.empty(h.mask_shape, dtype=np.float32)
    rt.sync()
    if h.mask_shape is not None:
        rt.comm.bcast(mask)
    y = None
    with rt.step("compute"):
        y = rt.backend.attention(rt.block(h.q), rt.block(h.k), rt.block(h.v), h.head_dim, h.scale, mask,
                                 h.causal)
    rt.sync()
    return emit(rt, y, h.dtype, h.keep_id, 1, h.out_shape, h.out_counts)
