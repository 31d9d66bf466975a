"""Node-side operations on resident matrices: activations, softmax, RMSNorm, LayerNorm,
rotary embeddings and grouped-query repeat (attention: :mod:`.attention`). Both halves here.

Every operation takes a :class:`ShardedMatrix` (each rank works on its own block), a
:class:`ReplicatedMatrix` (every rank computes the whole, the result stays replicated)
or an array (sharded on the fly along the axis that needs no communication, freed
afterwards). Results follow ``out=`` as for matmul: ``None`` returns them to the driver,
``"keep"`` leaves them where they were computed (same layout as the input),
``"h5:..."``/``"shm:..."`` write a file.

Softmax, RMSNorm and LayerNorm along the split axis of a sharded matrix combine per-rank
statistics with one allreduce of one value per row each (two for softmax and LayerNorm,
one for RMSNorm); along the other axis they need no communication.

Each function is one row of :data:`FUNCTIONS`: its parameters (a frozen dataclass that
travels in the ``nodeop`` header) and its rank half. Adding one means a row there, its
public method on :class:`NodeOpMethods`, and the backend op it needs (:mod:`cmatrix.backends.catalog`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.arrays import check_matrix, is_torch
from ..core.checks import check_axis, positive_int
from ..core.dtypes import empty, to_float32
from ..core.plan import Plan
from ..engine.driver import Driver
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import InputError
from ..io import sinks
from ..io.store import from_user
from .handles import Matrix, ShardedMatrix, check_live, check_room, deliver, keep, kept
from .placement import shard_host


@dataclass(frozen=True)
class NodeOp(Header, op="nodeop"):
    fn: str                          # a row of FUNCTIONS
    x: int
    dtype: str
    shape: tuple[int, int]
    out_shape: tuple[int, int]
    axis: int | None                 # the axis the function reduces over (None: element-wise)
    plan_axis: int | None            # x's split (None: replicated)
    counts: tuple[int, ...] | None
    out_counts: tuple[int, ...] | None
    keep_id: int | None
    params: Any                      # the function's parameters (FUNCTIONS[fn].params)

    CREATES = ("keep_id",)

    @property
    def across(self) -> bool:
        """Whether the function's statistics need every rank (it reduces along the split)."""
        return self.plan_axis is not None and self.axis is not None and self.axis == self.plan_axis


# ---- the functions: parameters and rank halves ----------------------------------------------

@dataclass(frozen=True)
class Activation:
    kind: str  # "silu", "gelu" or "gelu_tanh"


@dataclass(frozen=True)
class Softmax:
    pass


@dataclass(frozen=True)
class RmsNorm:
    weight: np.ndarray | None
    eps: float


@dataclass(frozen=True)
class LayerNorm:
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float


@dataclass(frozen=True)
class Rope:
    positions: np.ndarray
    inv_freq: np.ndarray
    head_dim: int
    interleaved: bool


@dataclass(frozen=True)
class RepeatKv:
    head_dim: int
    n_rep: int


def _computed(rt: Runtime, fn: Callable[[], Any]) -> Any:
    """``fn()`` as one step every rank passes before the next collective."""
    out = None
    with rt.step("compute"):
        out = fn()
    rt.sync()
    return out


def _statistic(rt: Runtime, h: NodeOp, kind: str, combine: str, shift: np.ndarray | None = None) -> Any:
    """One value per slice of x along ``h.axis``, combined across ranks when x is split there."""
    stat = _computed(rt, lambda: rt.backend.row_reduce(rt.block(h.x), kind, h.axis, shift))
    if h.across:
        rt.comm.allreduce(stat, combine)
    return stat


def _activation(rt: Runtime, h: NodeOp) -> Any:
    return _computed(rt, lambda: rt.backend.activation(rt.block(h.x), h.params.kind))


def _softmax(rt: Runtime, h: NodeOp) -> Any:
    top = _statistic(rt, h, "max", "max")
    shift = np.where(np.isfinite(top), top, 0).astype(np.float32)  # a slice all -inf: no shift
    total = _statistic(rt, h, "sumexp", "sum", shift)
    return _computed(rt, lambda: rt.backend.softmax_finish(rt.block(h.x), shift, total, h.axis))


def _rms_norm(rt: Runtime, h: NodeOp) -> Any:
    mean_square = (_statistic(rt, h, "sumsq", "sum") / h.shape[h.axis]).astype(np.float32)
    weight = h.params.weight
    if weight is not None and h.across:
        weight = weight[Plan(h.axis, h.counts).block(rt.comm.rank)]
    return _computed(rt, lambda: rt.backend.rms_finish(rt.block(h.x), mean_square, weight, h.params.eps,
                                                       h.axis))


def _layer_norm(rt: Runtime, h: NodeOp) -> Any:
    n = h.shape[h.axis]
    mean = (_statistic(rt, h, "sum", "sum") / n).astype(np.float32)
    # centred in a second pass: E[x^2] - E[x]^2 would cancel for rows far from zero
    variance = (_statistic(rt, h, "sumsq", "sum", mean) / n).astype(np.float32)
    weight, bias = h.params.weight, h.params.bias
    if h.across:
        mine = Plan(h.axis, h.counts).block(rt.comm.rank)
        weight = None if weight is None else weight[mine]
        bias = None if bias is None else bias[mine]
    return _computed(rt, lambda: rt.backend.layer_finish(rt.block(h.x), mean, variance, weight, bias,
                                                         h.params.eps, h.axis))


def _rope(rt: Runtime, h: NodeOp) -> Any:
    p = h.params

    def rotate() -> Any:
        positions = p.positions
        if h.plan_axis == 0:
            positions = positions[Plan(0, h.counts).block(rt.comm.rank)]
        angles = positions.astype(np.float64)[:, None] * p.inv_freq.astype(np.float64)[None, :]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        return rt.backend.rope(rt.block(h.x), cos, sin, p.head_dim, p.interleaved)

    return _computed(rt, rotate)


def _repeat_kv(rt: Runtime, h: NodeOp) -> Any:
    return _computed(rt, lambda: rt.backend.repeat_kv(rt.block(h.x), h.params.head_dim, h.params.n_rep))


@dataclass(frozen=True)
class Function:
    params: type
    rank_half: Callable[[Runtime, NodeOp], Any]


FUNCTIONS: dict[str, Function] = {
    "activation": Function(Activation, _activation),
    "softmax": Function(Softmax, _softmax),
    "rms_norm": Function(RmsNorm, _rms_norm),
    "layer_norm": Function(LayerNorm, _layer_norm),
    "rope": Function(Rope, _rope),
    "repeat_kv": Function(RepeatKv, _repeat_kv),
}
#: a function's name by the class of its parameters
_NAMES = {f.params: name for name, f in FUNCTIONS.items()}


@on_ranks(NodeOp)
def _nodeop(rt: Runtime, h: NodeOp, _: Any) -> np.ndarray | None:
    """One operand in, one result out. A replicated operand is computed by every rank (each
    holds it), so every rank takes the same steps; only the driver keeps a result that is
    not kept resident."""
    return emit(rt, FUNCTIONS[h.fn].rank_half(rt, h), h.dtype, h.keep_id, h.plan_axis, h.out_shape,
                h.out_counts)


def emit(rt: Runtime, y: Any, dtype: str, keep_id: int | None, plan_axis: int | None,
         out_shape: tuple[int, int], out_counts: tuple[int, ...] | None) -> np.ndarray | None:
    """Rank side: keep ``y`` resident (rounded to ``dtype``) or bring it to the driver,
    gathered by ``plan_axis``/``out_counts`` when it is sharded."""
    comm = rt.comm
    sharded = plan_axis is not None
    part = full = None
    with rt.step("store"):
        if keep_id is not None:
            keep(rt, keep_id, y, dtype)
        elif sharded or comm.is_driver:
            part = rt.backend.download(y, dtype)
            if sharded and comm.is_driver:
                full = empty(out_shape, dtype)
    rt.sync()
    if keep_id is not None:
        return None
    if not sharded:
        return part if comm.is_driver else None
    comm.gather_blocks(part, full, Plan(plan_axis, out_counts))
    return full


# ---- the driver's half ----------------------------------------------------------------------

def rope_frequencies(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """The standard rotary inverse frequencies ``theta ** (-2i / head_dim)`` (float32)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / theta ** exponent).astype(np.float32)


class NodeOpMethods:
    """``Cluster.silu``, ``gelu``, ``softmax``, ``rms_norm``, ``layer_norm``, ``rope``,
    ``repeat_kv``; the one hook used is ``driver``."""

    driver: Driver

    def silu(self, m: Any, out: str | None = None) -> Any:
        """``x * sigmoid(x)`` elementwise."""
        return run(self.driver, m, Activation("silu"), axis=None, out=out)

    def gelu(self, m: Any, approximate: str = "none", out: str | None = None) -> Any:
        """GELU elementwise; ``approximate="tanh"`` for the tanh form (as torch's F.gelu)."""
        if approximate not in ("none", "tanh"):
            raise InputError(f"approximate: 'none' or 'tanh', got {approximate!r}")
        kind = "gelu" if approximate == "none" else "gelu_tanh"
        return run(self.driver, m, Activation(kind), axis=None, out=out)

    def softmax(self, m: Any, axis: int = 1, out: str | None = None) -> Any:
        """Softmax along ``axis`` (1: each row sums to 1), computed in float32.
        A slice that is -inf throughout gives zeros (torch gives NaN)."""
        return run(self.driver, m, Softmax(), axis=check_axis(axis, "axis"), out=out)

    def rms_norm(self, m: Any, weight: Any = None, eps: float = 1e-6, axis: int = 1,
                 out: str | None = None) -> Any:
        """``x / sqrt(mean(x**2) + eps) * weight`` along ``axis`` (1: each row is a vector,
        as a Llama hidden state). ``weight``: a vector of length ``shape[axis]`` or None."""
        axis = check_axis(axis, "axis")
        m = _loaded(m)
        w = None if weight is None else _vector(weight, m.shape[axis], "weight")
        return run(self.driver, m, RmsNorm(w, _eps(eps)), axis=axis, out=out)

    def layer_norm(self, m: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5, axis: int = 1,
                   out: str | None = None) -> Any:
        """``(x - mean) / sqrt(var + eps) * weight + bias`` along ``axis`` (1: each row, as
        torch's LayerNorm over the last dimension; the variance is the biased one).
        ``weight``, ``bias``: vectors of length ``shape[axis]``, or None."""
        axis = check_axis(axis, "axis")
        m = _loaded(m)
        w = None if weight is None else _vector(weight, m.shape[axis], "weight")
        b = None if bias is None else _vector(bias, m.shape[axis], "bias")
        return run(self.driver, m, LayerNorm(w, b, _eps(eps)), axis=axis, out=out)

    def rope(self, m: Any, positions: Sequence[int] | Any, head_dim: int,
             theta: float = 10000.0, interleaved: bool = False, inv_freq: Any = None,
             out: str | None = None) -> Any:
        """Rotary position embedding of ``m`` (rows: tokens at ``positions``; columns:
        whole heads of ``head_dim`` side by side). ``interleaved=False`` rotates the two
        halves of each head (Hugging Face Llama), True rotates pairs (2i, 2i+1).
        ``inv_freq`` (head_dim/2 values) overrides ``theta``, e.g. for scaled ropes.
        A matrix sharded by columns must hold whole heads on every rank."""
        m = _loaded(m)
        rows, cols = m.shape
        head_dim = positive_int(head_dim, "head_dim")
        if head_dim % 2 or cols % head_dim:
            raise InputError(f"head_dim: must be even and divide the {cols} columns, got {head_dim}")
        if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            raise InputError(f"theta: a finite number > 0 (the rope base, e.g. 10000.0), got {theta!r}")
        pos = _vector(positions, rows, "positions")
        freq = rope_frequencies(head_dim, float(theta)) if inv_freq is None else \
            _vector(inv_freq, head_dim // 2, "inv_freq")
        _check_whole(m, head_dim, "rope")
        return run(self.driver, m, Rope(pos, freq, head_dim, bool(interleaved)), axis=None, out=out)

    def repeat_kv(self, m: Any, head_dim: int, n_rep: int, out: str | None = None) -> Any:
        """Each key/value head of ``head_dim`` columns repeated ``n_rep`` times in place
        (grouped-query attention: output head h is input head h // n_rep)."""
        m = _loaded(m)
        cols = m.shape[1]
        head_dim, n_rep = positive_int(head_dim, "head_dim"), positive_int(n_rep, "n_rep")
        if cols % head_dim:
            raise InputError(f"head_dim: {head_dim} does not divide the {cols} columns")
        _check_whole(m, head_dim, "repeat_kv")
        return run(self.driver, m, RepeatKv(head_dim, n_rep), axis=None, out=out, widen=n_rep)


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


def _eps(eps: Any) -> float:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise InputError(f"eps: a finite number >= 0, got {eps!r}")
    return float(eps)


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


def run(d: Driver, m: Any, params: Any, axis: int | None, out: str | None, widen: int = 1) -> Any:
    """Run the function ``params`` belongs to on one operand and route its result.

    ``axis``: the axis the function reduces over (None for element-wise ones). ``widen``:
    the result has ``widen`` times the columns (repeat_kv).
    """
    fn = _NAMES[type(params)]
    sink = sinks.parse(out)
    temporary = None
    if isinstance(m, Matrix):
        check_live(d, m, "m")
        if getattr(m, "quant", None):
            raise InputError(f"m: {fn} of a quantised matrix; quantised weights are for matmul only")
        check_room(sink, (m.shape[0], m.shape[1] * widen), m.dtype)
        target = m
    else:
        host = from_user(m, "m")
        check_matrix(host, "m")
        check_room(sink, (host.shape[0], host.shape[1] * widen), host.dtype)
        split = 0 if axis in (None, 1) else 1  # split where the function needs no communication
        temporary = target = shard_host(d, host, Plan.from_weights(host.shape[split], d.weights, split))
    try:
        rows, cols = target.shape
        out_shape = (rows, cols * widen)
        plan = target.plan if isinstance(target, ShardedMatrix) else None
        out_plan = None
        if plan is not None:
            widened = tuple(c * widen for c in plan.counts) if plan.axis == 1 else plan.counts
            out_plan = Plan(plan.axis, widened)
        keep_id = d.new_id() if sink.keep else None
        result = d.run(NodeOp(fn, target.id, target.dtype, target.shape, out_shape, axis,
                              plan.axis if plan else None, plan.counts if plan else None,
                              out_plan.counts if out_plan else None, keep_id, params))
    finally:
        if temporary is not None:
            temporary.free()
    if sink.keep:
        return kept(d, keep_id, out_shape, target.dtype, out_plan, target.kind)
    attrs = sinks.describe(fn, {"a": (getattr(m, "name", None), target.shape)}, target.dtype,
                           out_plan.axis if out_plan else -1, out_plan.counts if out_plan else ())
    return deliver(sink, fn, result, target.dtype, target.kind, attrs)
