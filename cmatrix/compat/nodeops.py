"""Node-side operations of the seed's ``cluster_matrix`` (over :mod:`cmatrix.ops.nodeops`).

Each runs where the matrix lives: on every rank's block of a split matrix, on
every rank for a full one. ``send_back=True`` returns a torch tensor;
``False`` keeps the result on the cluster as a new ``cluster_matrix``.
Matrices are 2-D with rows as tokens; attention inputs hold heads side by
side, (tokens, heads * head_dim), as a Linear layer's output does.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..ops.attention import check
from ..ops.handles import Matrix, ShardedMatrix
from .values import as_matrix, as_tensor, seed_layout


def _axis(dim: int) -> int:
    if dim in (-1, 1):
        return 1
    if dim in (-2, 0):
        return 0
    raise InputError(f"dim: 0, 1, -1 or -2 for a 2-D matrix, got {dim!r}")


def _whole_heads(m: ShardedMatrix, head_dim: int) -> bool:
    return m.axis == 1 and all(c % head_dim == 0 for c in m.counts)


def _split_by_groups(q: Any, k: Any, v: Any, head_dim: int) -> bool:
    """Whether q, k, v are all split by columns in the same whole key/value groups."""
    if not all(isinstance(x, ShardedMatrix) for x in (q, k, v)):
        return False
    if k.plan != v.plan or not _whole_heads(k, head_dim) or q.shape[1] % max(k.shape[1], 1):
        return False
    n_rep = q.shape[1] // k.shape[1]
    return q.axis == 1 and q.counts == tuple(c * n_rep for c in k.counts)


class SeedNodeOps:
    """Mixed into :class:`cmatrix.compat.matrix.cluster_matrix`."""

    def _operand(self, head_dim: int | None = None) -> Any:
        """The native operand. A matrix split by columns that do not fall on whole heads of
        ``head_dim`` (the seed splits by percentages alone) is fetched, to be split by heads."""
        m = self.handle if self.handle is not None else self._host
        if isinstance(head_dim, int) and head_dim > 0 and isinstance(m, ShardedMatrix) \
                and m.axis == 1 and not _whole_heads(m, head_dim):
            return m.gather()
        return m

    def _node(self, fn: str, send_back: bool, *args: Any, heads_of: int | None = None,
              **kwargs: Any) -> Any:
        if not send_back and self.handle is None:
            raise InputError("send_back: grid-mode matrices are not resident; pass send_back=True")
        result = getattr(self.cluster, fn)(self._operand(heads_of), *args,
                                           out=None if send_back else "keep", **kwargs)
        return as_tensor(result) if send_back else type(self)._wrap(self, result)

    def silu(self, send_back: bool = True) -> Any:
        """``x * sigmoid(x)`` elementwise."""
        return self._node("silu", send_back)

    def gelu(self, approximate: str = "none", send_back: bool = True) -> Any:
        """GELU elementwise (``approximate="tanh"`` for the tanh form)."""
        return self._node("gelu", send_back, approximate=approximate)

    def softmax(self, dim: int = -1, send_back: bool = True) -> Any:
        """Softmax along ``dim`` (-1: each row sums to 1), across ranks when the matrix is split there."""
        return self._node("softmax", send_back, axis=_axis(dim))

    def rms_norm(self, weight: Any = None, eps: float = 1e-6, send_back: bool = True) -> Any:
        """RMSNorm of each row (a token's hidden vector) times ``weight``."""
        return self._node("rms_norm", send_back, weight, eps=eps)

    def rope(self, positions: Any, head_dim: int, theta: float = 10000.0, interleaved: bool = False,
             send_back: bool = True) -> Any:
        """Rotary embedding of rows at ``positions`` (heads of ``head_dim`` side by side)."""
        return self._node("rope", send_back, positions, head_dim, theta=theta, interleaved=interleaved,
                          heads_of=head_dim)

    def repeat(self, n_rep: int, head_dim: int, send_back: bool = True) -> Any:
        """Each key/value head repeated ``n_rep`` times (grouped-query attention)."""
        return self._node("repeat_kv", send_back, head_dim, n_rep, heads_of=head_dim)

    def cluster_flash_attn(self, cluster_matrixK: Any, cluster_matrixV: Any,  # noqa: N803
                           head_dim: int | None = None, scale: float | None = None, mask: Any = None,
                           causal: bool = False, send_back: bool | None = None, *,
                           TransposeQ: bool = False, TransposeK: bool = False, TransposeV: bool = False,  # noqa: N803
                           send_back_result: bool | None = None, operation: str = "flash_attn_ext",
                           extra_param_value: float | None = None) -> Any:
        """Attention of this matrix's queries over K and V with heads split across ranks in
        whole key/value groups (by this matrix's percentages); ``scale`` defaults to
        1/sqrt(head_dim); ``mask`` is additive (or boolean, True: may attend); ``causal``
        lets query i see keys up to i + Sk - Sq.

        cmatrix's call gives ``head_dim``: Q is (Sq, H*head_dim), K and V (Sk, Hkv*head_dim),
        and the result (Sq, H*head_dim) comes back by default. The seed's call leaves it out:
        Q, K, V were made from ``[1, H, T, D]`` / ``[H, T, D]`` tensors (or are 2-D: one head
        of all their columns), ``extra_param_value`` is the scale, ``send_back_result``
        (default False) says whether the result comes back, and it comes back in the seed's
        layout, heads stacked along the rows: ``[H*T, D]``."""
        if operation != "flash_attn_ext":
            raise InputError(f"operation: 'flash_attn_ext', the seed's only attention, got {operation!r}")
        if TransposeQ or TransposeK or TransposeV:
            raise InputError("TransposeQ/K/V: attention takes Q, K and V in their own layout "
                             "(tokens by rows); transpose them before making the cluster matrices")
        seed_call = head_dim is None
        send_back = send_back_result if send_back_result is not None else send_back
        send_back = (not seed_call) if send_back is None else bool(send_back)
        scale = extra_param_value if extra_param_value is not None else scale
        if isinstance(mask, SeedNodeOps):
            mask = mask.send_back()
        if head_dim is None:
            head_dim = getattr(self, "head_dim", None) or self.shape[1]  # 2-D: one head

        def operand(x: Any) -> Any:
            return x._operand() if isinstance(x, SeedNodeOps) else x

        q, k, v = operand(self), operand(cluster_matrixK), operand(cluster_matrixV)
        if not _split_by_groups(q, k, v, head_dim):
            shapes = [x.shape if isinstance(x, Matrix) else as_matrix(x).shape for x in (q, k, v)]
            check(*shapes, head_dim, scale, mask)  # refuse bad input before fetching anything
            # Full matrices, or splits by percentages that do not fall on whole key/value
            # groups: fetch them (the driver holds full ones) and let attention split by heads.
            q, k, v = (x.gather() if isinstance(x, Matrix) else x for x in (q, k, v))
        result = self.cluster.attention(q, k, v, head_dim, scale=scale, mask=mask, causal=causal,
                                        weights=self.node_percentages,
                                        out=None if send_back else "keep")
        if not send_back:
            kept = type(self)._wrap(self, result)
            kept.head_dim = head_dim if seed_call else None
            return kept
        result = as_tensor(result)
        return seed_layout(result, head_dim) if seed_call else result
