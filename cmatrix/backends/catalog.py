"""Every operation a backend runs, declared once.

``DENSE_OPS`` (matmul, add, sub) each backend implements itself. ``NODE_OPS`` are the
node-side operations on resident blocks (activations, the pieces of a softmax, an
RMSNorm and a LayerNorm split across ranks, rotary embeddings, grouped-query repeat, attention,
transpose). Each row of that table gives:

* ``check``: the operation's signature, run by :class:`~cmatrix.backends.device.Device`
  before a backend sees anything. It takes the operands (objects with ``shape``,
  ``dtype`` and ``empty``) and parameters, raises :class:`InputError` naming what is
  wrong, and returns a :class:`Call`: the parameters as kernels take them, the result's
  shape and dtype, what an empty first operand gives, and a description for errors.
* ``host``: a numpy float32 kernel (:mod:`.host_ops`). A backend without a device kernel
  of that name runs it on the host: operands come down as float32, the result goes
  back up as float32 (:meth:`~cmatrix.backends.base.Backend.run_node_op`).
* ``returns``: ``"block"`` (a resident result) or ``"vector"`` (a float32 host vector).

A backend with a device kernel defines a method of the op's name taking the operand
handles, then the parameters in the order ``Call.params`` gives them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from . import host_ops

DENSE_OPS = ("matmul", "add", "sub")


@dataclass(frozen=True)
class Call:
    """A checked node-op call: what the kernel gets and what the result is."""

    params: tuple
    shape: tuple[int, ...]
    what: str
    dtype: str = "float32"
    #: the result of a reduction ("vector") whose operand is empty
    identity: np.ndarray | None = None


@dataclass(frozen=True)
class NodeOp:
    name: str
    blocks: int                      # operand blocks, the first arguments
    check: Callable[..., Call]
    host: Callable[..., np.ndarray]
    returns: str = "block"


def _matrix(op: str, name: str, x: Any) -> tuple[int, int]:
    if len(x.shape) != 2:
        raise InputError(f"{op}: {name} must be a 2-D block, got shape {x.shape}")
    return x.shape[0], x.shape[1]


def _axis(op: str, axis: Any) -> int:
    if isinstance(axis, bool) or axis not in (0, 1):
        raise InputError(f"{op}: axis must be 0 or 1, got {axis!r}")
    return int(axis)


def _vector(op: str, name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise InputError(f"{op}: {name} must be a vector of length {n}, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _array(op: str, name: str, values: Any, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != shape:
        raise InputError(f"{op}: {name} must have shape {shape}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _heads(op: str, name: str, cols: int, head_dim: Any) -> int:
    if isinstance(head_dim, bool) or int(head_dim) != head_dim or head_dim < 1:
        raise InputError(f"{op}: head_dim must be a positive integer, got {head_dim!r}")
    if cols % head_dim:
        raise InputError(f"{op}: {name} has {cols} columns, not a multiple of head_dim={head_dim} "
                         f"(blocks hold whole heads side by side)")
    return cols // head_dim


def _activation(x: Any, kind: str) -> Call:
    """``kind`` ("silu", "gelu" (exact, erf), "gelu_tanh") of ``x``, element-wise, in float32."""
    if kind not in host_ops.ACTIVATIONS:
        raise InputError(f"activation: unknown kind {kind!r}; one of {', '.join(host_ops.ACTIVATIONS)}")
    _matrix("activation", "x", x)
    return Call((kind,), x.shape, f"activation {kind} of {x.dtype} {x.shape}")


def _row_reduce(x: Any, kind: str, axis: int, shift: np.ndarray | None = None) -> Call:
    """``x`` reduced along ``axis`` to a float32 host vector of length ``x.shape[1 - axis]``:
    "max"; "sum"; "sumexp", the sum of exp(x - shift); "sumsq", the sum of (x - shift)**2
    (``shift`` one value per slice, None for 0; a -inf shift counts as 0 so an all -inf
    slice sums to 0, not NaN). An empty block gives the identity (-inf for max, else 0)."""
    if kind not in host_ops.REDUCTIONS:
        raise InputError(f"row_reduce: unknown kind {kind!r}; one of {', '.join(host_ops.REDUCTIONS)}")
    axis = _axis("row_reduce", axis)
    _matrix("row_reduce", "x", x)
    n = x.shape[1 - axis]
    if shift is not None:
        if kind not in ("sumexp", "sumsq"):
            raise InputError(f"row_reduce: shift applies to sumexp and sumsq only, not {kind}")
        shift = _vector("row_reduce", "shift", shift, n)
    identity = np.full(n, -np.inf if kind == "max" else 0.0, dtype=np.float32)
    return Call((kind, axis, shift), (n,), f"row_reduce {kind} along axis {axis} of {x.dtype} {x.shape}",
                identity=identity)


def _softmax_finish(x: Any, shift: np.ndarray, total: np.ndarray, axis: int) -> Call:
    """exp(x - shift) / total along ``axis`` (the last step of a softmax split across ranks);
    a slice whose ``total`` is 0 (all -inf) gives zeros."""
    axis = _axis("softmax_finish", axis)
    _matrix("softmax_finish", "x", x)
    n = x.shape[1 - axis]
    shift = _vector("softmax_finish", "shift", shift, n)
    total = _vector("softmax_finish", "total", total, n)
    return Call((shift, total, axis), x.shape, f"softmax_finish along axis {axis} of {x.dtype} {x.shape}")


def _rms_finish(x: Any, mean_square: np.ndarray, weight: np.ndarray | None, eps: float, axis: int) -> Call:
    """x / sqrt(mean_square + eps) * weight: RMSNorm along ``axis``; ``weight`` (length
    ``x.shape[axis]``) is broadcast across the slices, None for no scaling."""
    axis = _axis("rms_finish", axis)
    _matrix("rms_finish", "x", x)
    mean_square = _vector("rms_finish", "mean_square", mean_square, x.shape[1 - axis])
    if weight is not None:
        weight = _vector("rms_finish", "weight", weight, x.shape[axis])
    return Call((mean_square, weight, float(eps), axis), x.shape,
                f"rms_finish along axis {axis} of {x.dtype} {x.shape}")


def _layer_finish(x: Any, mean: np.ndarray, variance: np.ndarray, weight: np.ndarray | None,
                  bias: np.ndarray | None, eps: float, axis: int) -> Call:
    """(x - mean) / sqrt(variance + eps) * weight + bias: LayerNorm along ``axis`` (``mean``
    and ``variance`` one value per slice; ``weight`` and ``bias`` of length ``x.shape[axis]``
    or None)."""
    axis = _axis("layer_finish", axis)
    _matrix("layer_finish", "x", x)
    n = x.shape[1 - axis]
    mean = _vector("layer_finish", "mean", mean, n)
    variance = _vector("layer_finish", "variance", variance, n)
    weight = None if weight is None else _vector("layer_finish", "weight", weight, x.shape[axis])
    bias = None if bias is None else _vector("layer_finish", "bias", bias, x.shape[axis])
    return Call((mean, variance, weight, bias, float(eps), axis), x.shape,
                f"layer_finish along axis {axis} of {x.dtype} {x.shape}")


def _rope(x: Any, cos: np.ndarray, sin: np.ndarray, head_dim: int, interleaved: bool = False) -> Call:
    """Rotary position embedding of whole heads side by side in ``x`` (rows, heads * head_dim);
    ``cos``/``sin`` are (rows, head_dim // 2). Pairs are (i, i + head_dim/2) (Hugging Face
    rotate_half) or, ``interleaved``, (2i, 2i + 1) (GPT-J / Meta)."""
    rows, cols = _matrix("rope", "x", x)
    _heads("rope", "x", cols, head_dim)
    if head_dim % 2:
        raise InputError(f"rope: head_dim must be even, got {head_dim}")
    cos = _array("rope", "cos", cos, (rows, head_dim // 2))
    sin = _array("rope", "sin", sin, (rows, head_dim // 2))
    style = "interleaved" if interleaved else "rotate_half"
    return Call((cos, sin, int(head_dim), bool(interleaved)), x.shape,
                f"rope ({style}, head_dim={head_dim}) of {x.dtype} {x.shape}")


def _repeat_kv(x: Any, head_dim: int, n_rep: int) -> Call:
    """(rows, kv * head_dim) -> (rows, kv * n_rep * head_dim), each head repeated n_rep times
    in place (output head h is input head h // n_rep, as Hugging Face ``repeat_kv``)."""
    rows, cols = _matrix("repeat_kv", "x", x)
    _heads("repeat_kv", "x", cols, head_dim)
    if isinstance(n_rep, bool) or int(n_rep) != n_rep or n_rep < 1:
        raise InputError(f"repeat_kv: n_rep must be a positive integer, got {n_rep!r}")
    return Call((int(head_dim), int(n_rep)), (rows, cols * int(n_rep)),
                f"repeat_kv (head_dim={head_dim}, n_rep={n_rep}) of {x.dtype} {x.shape}")


def _attention(q: Any, k: Any, v: Any, head_dim: int, scale: float, mask: np.ndarray | None = None,
               causal: bool = False) -> Call:
    """Scaled dot-product attention of q (Sq, H * head_dim) over k, v (Sk, Hkv * head_dim);
    query head h uses kv head h // (H // Hkv). scores = q_h k^T * scale (+ ``mask``, a
    float32 (Sq, Sk) host array that may hold -inf); ``causal`` lets query i see keys
    j <= i + (Sk - Sq) (bottom-right aligned, as decoding with a KV cache). Softmax in
    float32; a query row that sees no key gives zeros. An empty q (a rank holding no
    heads) gives an empty result; empty k/v with a non-empty q is an error."""
    sq, q_cols = _matrix("attention", "q", q)
    sk, k_cols = _matrix("attention", "k", k)
    _matrix("attention", "v", v)
    n_heads = _heads("attention", "q", q_cols, head_dim)
    n_kv = _heads("attention", "k", k_cols, head_dim)
    if v.shape != k.shape:
        raise InputError(f"attention: v must have k's shape {k.shape}, got {v.shape}")
    if mask is not None:
        mask = _array("attention", "mask", mask, (sq, sk))
    if not q.empty and (k.empty or v.empty):
        raise InputError(f"attention: k/v are empty ({k.shape}) but q {q.shape} is not: "
                         "every query needs keys and values")
    if not q.empty and n_heads % n_kv:
        raise InputError(f"attention: {n_heads} query heads cannot share {n_kv} kv heads "
                         "(the query heads must be a multiple of the kv heads)")
    what = (f"attention of q {q.dtype} {q.shape}, k/v {k.dtype} {k.shape} (head_dim={head_dim}, "
            f"mask={'yes' if mask is not None else 'no'}, causal={causal})")
    return Call((int(head_dim), float(scale), mask, bool(causal)), q.shape, what)


def _transpose(x: Any) -> Call:
    """A resident, contiguous transposed copy of ``x``; it keeps ``x``'s dtype (values exact)."""
    rows, cols = _matrix("transpose", "x", x)
    return Call((), (cols, rows), f"transpose of {x.dtype} {x.shape}", dtype=x.dtype)


NODE_OPS: dict[str, NodeOp] = {op.name: op for op in (
    NodeOp("activation", 1, _activation, host_ops.activation),
    NodeOp("row_reduce", 1, _row_reduce, host_ops.row_reduce, returns="vector"),
    NodeOp("softmax_finish", 1, _softmax_finish, host_ops.softmax_finish),
    NodeOp("rms_finish", 1, _rms_finish, host_ops.rms_finish),
    NodeOp("layer_finish", 1, _layer_finish, host_ops.layer_finish),
    NodeOp("rope", 1, _rope, host_ops.rope),
    NodeOp("repeat_kv", 1, _repeat_kv, host_ops.repeat_kv),
    NodeOp("attention", 3, _attention, host_ops.attention),
    NodeOp("transpose", 1, _transpose, host_ops.transpose),
)}
