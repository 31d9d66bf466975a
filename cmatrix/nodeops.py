"""Node-side operations on resident matrices (driver half): activations,
softmax, RMSNorm, rotary embeddings, grouped-query repeat and attention.

Every operation takes a :class:`ShardedMatrix` (each rank works on its own
block), a :class:`ReplicatedMatrix` (every rank computes the whole, the result
stays replicated) or an array (sharded on the fly along the axis that needs
no communication, freed afterwards). Results follow ``out=`` as for matmul:
``None`` returns them to the driver, ``"keep"`` leaves them where they were
computed (same layout as the input), ``"h5:..."``/``"shm:..."`` write a file.

Softmax and RMSNorm along the split axis of a sharded matrix combine per-rank
statistics with two (softmax) or one (RMSNorm) allreduce of one value per
row; along the other axis they need no communication. Attention splits heads
across ranks in whole key/value groups, so it needs none either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import sinks
from .arrays import check_matrix, from_user, is_torch, to_user
from .checks import check_axis
from .dtypes import promote, to_float32
from .errors import InputError
from .matrix import Matrix, ReplicatedMatrix, ShardedMatrix
from .plan import Plan, split_counts, validate_weights

if TYPE_CHECKING:
    from .cluster import Cluster

ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}


def _vector(x: Any, length: int, arg: str) -> np.ndarray:
    """A float32 host vector of ``length`` from an array, tensor or list."""
    if x is None:
        raise InputError(f"{arg}: required")
    try:
        if isinstance(x, (list, tuple, range, np.ndarray)):
            v = np.asarray(x, dtype=np.float64)
        elif is_torch(x):
            v = x.detach().cpu().double().numpy()
        else:
            host = from_user(x, arg)
            v = to_float32(host.data, host.dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{arg}: expected numbers, got {type(x).__name__}") from exc
    v = np.asarray(v, dtype=np.float32).reshape(-1) if np.ndim(v) <= 1 else None
    if v is None or v.shape[0] != length:
        raise InputError(f"{arg}: expected a vector of length {length}, got shape {np.shape(x)}")
    if not np.all(np.isfinite(v)):
        raise InputError(f"{arg}: contains NaN or infinity")
    return v


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """The standard rotary inverse frequencies ``theta ** (-2i / head_dim)`` (float32)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / theta ** exponent).astype(np.float32)


class NodeOps:
    """Mixed into :class:`cmatrix.Cluster` (``self`` is the cluster)."""

    # ---- public operations ----------------------------------------------------------

    def silu(self: Cluster, m: Any, out: str | None = None) -> Any:
        """``x * sigmoid(x)`` elementwise."""
        return _unary(self, m, "activation", {"kind": "silu"}, axis=None, out=out)

    def gelu(self: Cluster, m: Any, approximate: str = "none", out: str | None = None) -> Any:
        """GELU elementwise; ``approximate="tanh"`` for the tanh form (as torch's F.gelu)."""
        if approximate not in ("none", "tanh"):
            raise InputError(f"approximate: 'none' or 'tanh', got {approximate!r}")
        kind = "gelu" if approximate == "none" else "gelu_tanh"
        return _unary(self, m, "activation", {"kind": kind}, axis=None, out=out)

    def softmax(self: Cluster, m: Any, axis: int = 1, out: str | None = None) -> Any:
        """Softmax along ``axis`` (1: each row sums to 1), computed in float32.
        A slice that is -inf throughout gives zeros (torch gives NaN)."""
        axis = check_axis(axis, "axis")
        return _unary(self, m, "softmax", {}, axis=axis, out=out)

    def rms_norm(self: Cluster, m: Any, weight: Any = None, eps: float = 1e-6, axis: int = 1,
                 out: str | None = None) -> Any:
        """``x / sqrt(mean(x**2) + eps) * weight`` along ``axis`` (1: each row is a vector,
        as a Llama hidden state). ``weight``: a vector of length ``shape[axis]`` or None."""
        axis = check_axis(axis, "axis")
        m = _loaded(m)
        length = m.shape[axis]
        w = None if weight is None else _vector(weight, length, "weight")
        if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
            raise InputError(f"eps: a finite number >= 0, got {eps!r}")
        return _unary(self, m, "rms_norm", {"weight": w, "eps": float(eps)}, axis=axis, out=out)

    def rope(self: Cluster, m: Any, positions: Sequence[int] | Any, head_dim: int,
             theta: float = 10000.0, interleaved: bool = False, inv_freq: Any = None,
             out: str | None = None) -> Any:
        """Rotary position embedding of ``m`` (rows: tokens at ``positions``; columns:
        whole heads of ``head_dim`` side by side). ``interleaved=False`` rotates the two
        halves of each head (Hugging Face Llama), True rotates pairs (2i, 2i+1).
        ``inv_freq`` (head_dim/2 values) overrides ``theta``, e.g. for scaled ropes.
        A matrix sharded by columns must hold whole heads on every rank."""
        m = _loaded(m)
        rows, cols = m.shape
        head_dim = _positive_int(head_dim, "head_dim")
        if head_dim % 2 or cols % head_dim:
            raise InputError(f"head_dim: must be even and divide the {cols} columns, got {head_dim}")
        if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            raise InputError(f"theta: a finite number > 0 (the rope base, e.g. 10000.0), got {theta!r}")
        pos = _vector(positions, rows, "positions")
        freq = rope_frequencies(head_dim, float(theta)) if inv_freq is None else \
            _vector(inv_freq, head_dim // 2, "inv_freq")
        _check_whole(m, head_dim, "rope")
        params = {"positions": pos, "inv_freq": freq, "head_dim": head_dim,
                  "interleaved": bool(interleaved)}
        return _unary(self, m, "rope", params, axis=None, out=out)

    def repeat_kv(self: Cluster, m: Any, head_dim: int, n_rep: int, out: str | None = None) -> Any:
        """Each key/value head of ``head_dim`` columns repeated ``n_rep`` times in place
        (grouped-query attention: output head h is input head h // n_rep)."""
        m = _loaded(m)
        cols = m.shape[1]
        head_dim, n_rep = _positive_int(head_dim, "head_dim"), _positive_int(n_rep, "n_rep")
        if cols % head_dim:
            raise InputError(f"head_dim: {head_dim} does not divide the {cols} columns")
        _check_whole(m, head_dim, "repeat_kv")
        return _unary(self, m, "repeat_kv", {"head_dim": head_dim, "n_rep": n_rep}, axis=None,
                      out=out, widen=n_rep)

    def attention(self: Cluster, q: Any, k: Any, v: Any, head_dim: int, scale: float | None = None,
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
        from . import attention as attn

        return attn.run(self, q, k, v, head_dim, scale, mask, causal, weights, out)


def _positive_int(x: Any, arg: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise InputError(f"{arg}: a positive integer, got {x!r}")
    return int(x)


def _loaded(m: Any) -> Any:
    """A cluster matrix as is; anything else read once into host storage (checked 2-D)."""
    if isinstance(m, Matrix):
        return m
    host = from_user(m, "m")
    check_matrix(host, "m")
    return host


def _check_whole(m: Any, head_dim: int, op: str) -> None:
    if isinstance(m, ShardedMatrix) and m.axis == 1 and any(c % head_dim for c in m.counts):
        raise InputError(f"{op}: m is split by columns as {list(m.counts)}, not in whole heads of "
                         f"{head_dim}; shard it with counts that are multiples of head_dim")


def _unary(cl: Cluster, m: Any, fn: str, params: dict, axis: int | None, out: str | None,
           widen: int = 1) -> Any:
    """Run node op ``fn`` on one operand and route its result.

    ``axis``: the axis the op reduces over (None for elementwise ops). ``widen``:
    the result has ``widen`` times the columns (repeat_kv).
    """
    sink = sinks.parse(out)
    temporary = None
    if isinstance(m, Matrix):
        cl._check_live(m, "m")
        if getattr(m, "quant", None):
            raise InputError(f"m: {fn} of a quantised matrix; quantised weights are for matmul only")
        target = m
    else:
        host = from_user(m, "m")
        check_matrix(host, "m")
        split = 0 if axis in (None, 1) else 1  # split where the op needs no communication
        temporary = target = cl._shard_host(host, Plan.from_weights(host.shape[split], cl.weights, split))
    try:
        rows, cols = target.shape
        out_shape = (rows, cols * widen)
        sharded = isinstance(target, ShardedMatrix)
        plan = target.plan if sharded else None
        out_plan = None
        if sharded:
            counts = tuple(c * widen for c in plan.counts) if plan.axis == 1 else plan.counts
            out_plan = Plan(plan.axis, counts)
        keep_id = cl._new_id() if sink.keep else None
        header = {"op": "nodeop", "fn": fn, "x": target.id, "dtype": target.dtype,
                  "shape": target.shape, "out_shape": out_shape, "axis": axis,
                  "plan_axis": plan.axis if sharded else None, "counts": plan.counts if sharded else None,
                  "out_counts": out_plan.counts if sharded else None, "keep_id": keep_id, **params}
        result = cl._run(header)
    finally:
        if temporary is not None:
            temporary.free()
    return _route(cl, sink, fn, result, keep_id, out_shape, target.dtype, target.kind, out_plan,
                  getattr(m, "name", None), target.shape)


def _route(cl: Cluster, sink: sinks.Sink, fn: str, result: Any, keep_id: int | None,
           shape: tuple[int, int], dtype: str, kind: str, plan: Plan | None, name: str | None,
           in_shape: tuple[int, int]) -> Any:
    if sink.keep:
        if plan is None:
            return ReplicatedMatrix(cl, keep_id, shape, dtype, None, kind)
        return ShardedMatrix(cl, keep_id, shape, dtype, plan, None, kind)
    if sink.is_file:
        attrs = sinks.describe(fn, {"a": (name, in_shape)}, dtype,
                               plan.axis if plan else -1, plan.counts if plan else ())
        return sinks.deliver(sink, result, dtype, attrs, fn)
    return to_user(result, dtype, kind)


def head_plans(kv_heads: int, n_rep: int, head_dim: int, weights: Sequence[float],
               size: int) -> tuple[Plan, Plan]:
    """(q plan, k/v plan): whole key/value groups per rank in proportion to ``weights``."""
    w = validate_weights(weights, size)
    groups = split_counts(kv_heads, w)
    kv = Plan(1, tuple(int(g) * head_dim for g in groups))
    return Plan(1, tuple(c * n_rep for c in kv.counts)), kv


def result_dtype(*dtypes: str) -> str:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = promote(out, d)
    return out
