"""The driver's view of the cluster.

Rank 0 (the driver) runs the user's program; every :class:`Cluster` method
validates its arguments first, so bad input is refused before any data moves,
then announces one command that all ranks run together (see :mod:`.ops`).
"""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

# ops* modules register the ranks' halves of the commands
from . import (  # noqa: F401
    __version__,
    backends,
    caching,
    elementwise,
    ops,
    ops_cache,
    ops_grid,
    ops_llm,
    ops_node,
    sinks,
)
from . import cache as cache_mod
from . import quant as q
from .arrays import HostArray, check_matrix, from_user, to_user
from .checks import check_axis, check_inner, check_versions, per_rank
from .dtypes import promote
from .errors import ClusterClosedError, CMatrixError, InputError, RankError
from .grid import GridOps
from .matrix import Matrix, ReplicatedMatrix, ShardedMatrix
from .nodeops import NodeOps
from .plan import Plan, equal_weights, validate_weights
from .ranks import RankInfo, RankTable
from .runtime import Runtime


class Cluster(NodeOps, GridOps):
    """Handle the driver uses to shard matrices and run operations on all ranks."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._comm = runtime.comm
        self._next_id = 1
        self._pending_free: list[int] = []
        self._closed = False
        self._busy = False
        self.exit_status = 0
        self.weights = equal_weights(self.size)
        self.ranks = RankTable([])
        self._config: tuple | None = None
        #: cached matrices by name: every live handle made with shard(..., cache=...)
        self._named: dict[str, Any] = {}

    @property
    def size(self) -> int:
        """Number of ranks (device slots), driver included."""
        return self._comm.size

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- set-up ----------------------------------------------------------------

    def configure(self, weights: Sequence[float] | None = None,
                  backends_: str | Sequence[str] | None = None,
                  threads: int | None = None, accel: bool | Sequence[bool] | None = None) -> None:
        names = per_rank(self.size, backends_ if backends_ is not None else "numpy", "backends")
        names = [backends.canonical(n) for n in names]
        accel_list = [bool(a) for a in per_rank(self.size, True if accel is None else accel, "accel")]
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads: expected a positive integer, got {threads!r}")
        w = equal_weights(self.size) if weights is None else validate_weights(weights, self.size)
        config = (tuple(names), threads, tuple(accel_list))
        if self._config is not None and config != self._config:
            names0, threads0, accel0 = self._config
            raise InputError(f"init(): the cluster already runs with backends={list(names0)}, "
                             f"threads={threads0}, accel={list(accel0)}; start a new job to "
                             "change them")
        self.weights = w
        if self._config is None:
            header = {"op": "configure", "version": __version__, "backends": names,
                      "threads": threads, "accel": accel_list}
            infos = self._run(header)
            check_versions(infos)
            self._config = config
            self._infos = infos
        self.ranks = RankTable([
            RankInfo(rank=i["rank"], host=i["host"], local_rank=i["local_rank"],
                     local_size=i["local_size"], backend=i["backend"], device=i["device"],
                     weight=float(self.weights[i["rank"]]), threads=i["threads"],
                     fallback=i.get("fallback"), memory=i.get("memory"),
                     dtypes=tuple(i.get("dtypes", ())), versions=i["versions"])
            for i in self._infos
        ])

    # ---- data placement ----------------------------------------------------------

    def shard(self, w: Any, name: str | None = None, weights: Sequence[float] | None = None,
              axis: int = 1, quant: str | None = None, quant_axis: int = 0,
              cache: str | None = None, align: int = 1) -> ShardedMatrix:
        """Split ``w`` along ``axis`` (1: columns, 0: rows) in proportion to
        ``weights`` (default: the cluster's) and keep each block resident on its rank.

        ``cache`` (needs ``name``): "save" also writes each shard to its node's
        disk; "load" sends nothing and reuses what the ranks hold in memory or on
        disk (``w`` may be None: shape, dtype and layout come from the cache);
        "auto" reuses identical shards and sends the rest. A missing or stale
        shard fails "load" with a :class:`CacheError` naming rank, host, file
        and the difference. See :mod:`cmatrix.caching`.

        ``quant`` ("q8_0" or "q4_0") rounds the weight to 32-value blocks along
        ``quant_axis``, the axis a matmul with it contracts: 0 for ``x @ w``,
        1 for ``x @ w.T`` (``transpose_b=True``, the layout of torch's Linear).
        ggml ranks store the blocks; other backends hold their float32 values.

        ``align``: every rank's count is a multiple of it (e.g. a head's width,
        so attention or rope can work on whole heads), the remainder aside.
        """
        if isinstance(w, Matrix):
            raise InputError("w: already on the cluster; shard() takes an array, tensor or path")
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise InputError(f"align: a positive integer, got {align!r}")
        if cache is not None:
            return caching.shard_cached(self, w, name, weights, axis, quant, quant_axis, cache, align)
        host = from_user(w, "w")
        check_matrix(host, "w")
        axis = check_axis(axis, "axis")
        if quant is not None:
            q.check_kind(quant)
            quant_axis = check_axis(quant_axis, "quant_axis")
            q.check_row_length(host.shape[quant_axis], quant, f"w.shape[{quant_axis}] (quant_axis)")
            if quant_axis == axis:  # every rank holds whole blocks
                align = math.lcm(align, q.BLOCK)
        shares = self.weights if weights is None else validate_weights(weights, self.size)
        plan = Plan.from_weights(host.shape[axis], shares, axis, align)
        return self._shard_host(host, plan, name, quant, quant_axis)

    def replicate(self, x: Any, name: str | None = None) -> ReplicatedMatrix:
        """Send ``x`` whole to every rank and keep it resident (for reuse across calls)."""
        host = from_user(x, "x")
        check_matrix(host, "x")
        self._check_dtype(host.dtype)
        ident = self._new_id()
        self._run({"op": "replicate", "id": ident, "shape": host.shape, "dtype": host.dtype},
                  np.ascontiguousarray(host.data))
        return ReplicatedMatrix(self, ident, host.shape, host.dtype, name, host.kind)

    def _shard_host(self, host: HostArray, plan: Plan, name: str | None = None,
                    quant: str | None = None, quant_axis: int = 0) -> ShardedMatrix:
        if quant is None:
            self._check_dtype(host.dtype, plan.counts)
        ident = self._new_id()
        header = {"op": "shard", "id": ident, "shape": host.shape, "dtype": host.dtype,
                  "axis": plan.axis, "counts": plan.counts, "quant": quant, "quant_axis": quant_axis,
                  "name": name, "bands": ops.band_count(host.shape, host.dtype, plan)}
        self._run(header, np.ascontiguousarray(host.data))
        # A quantised matrix holds float32 values (block scale times code).
        dtype = "float32" if quant else host.dtype
        return ShardedMatrix(self, ident, host.shape, dtype, plan, name, host.kind, quant, quant_axis)

    def _check_dtype(self, dtype: str, counts: Sequence[int] | None = None) -> None:
        """Refuse, before data moves, a dtype that a rank holding data cannot compute in."""
        for r in self.ranks:
            if dtype not in r.dtypes and (counts is None or counts[r.rank] > 0):
                raise InputError(f"rank {r.rank} ({r.host}, {r.backend} on {r.device}) cannot compute "
                                 f"in {dtype} (it has {', '.join(r.dtypes)}); convert the data, give "
                                 "that rank a zero share, or choose another backend for it")

    # ---- operations ---------------------------------------------------------------

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
        distributed and returns a ShardedMatrix.
        """
        sink = sinks.parse(out)
        keep = sink.keep
        transpose_a, transpose_b = bool(transpose_a), bool(transpose_b)
        host_b = None
        if isinstance(b, ShardedMatrix):
            self._check_live(b, "b")
            b_shape, b_plan, b_dtype, b_kind = b.shape, b.plan, b.dtype, b.kind
            if b.quant and transpose_b != (b.quant_axis == 1):
                raise InputError(f"b: {b.quant} blocks run along axis {b.quant_axis}, so the matmul must "
                                 f"contract that axis: pass transpose_b={b.quant_axis == 1}")
        elif isinstance(b, Matrix):
            raise InputError("b: must be sharded (cl.shard(b)); a replicated b leaves "
                             "nothing to split")
        else:  # an array: shard it along op(b)'s columns for this call only
            host_b = from_user(b, "b")
            check_matrix(host_b, "b")
            axis = 0 if transpose_b else 1
            b_shape, b_dtype, b_kind = host_b.shape, host_b.dtype, host_b.kind
            b_plan = Plan.from_weights(b_shape[axis], self.weights, axis)
        k_b, n = (b_shape[1], b_shape[0]) if transpose_b else b_shape
        b_op_axis = 1 - b_plan.axis if transpose_b else b_plan.axis
        mode = "output" if b_op_axis == 1 else "contraction"
        header = {"op": "matmul", "mode": mode, "b_axis": b_plan.axis, "counts": b_plan.counts,
                  "transpose_b": transpose_b, "a_id": None, "a_axis": None}
        a_payload, lead, kind_a, dtype_a, transpose_a = self._place_a(
            a, b_plan, mode, transpose_a, header, (k_b, n))
        m = header["a_shape"][1] if transpose_a else header["a_shape"][0]
        out_dtype = promote(dtype_a, b_dtype)
        kind = "torch" if "torch" in (kind_a, b_kind) else "numpy"
        header.update(transpose_a=transpose_a, out_shape=(m, n), out_dtype=out_dtype,
                      keep_id=self._new_id() if keep else None)
        if keep and mode == "contraction":
            header["row_counts"] = Plan.from_weights(m, self.weights, 0).counts
        temporary = self._shard_host(host_b, b_plan) if host_b is not None else None
        try:
            header["b"] = (temporary or b).id
            result = self._run(header, a_payload)
        finally:
            if temporary is not None:
                temporary.free()
        if keep:
            plan = Plan(1, b_plan.counts) if mode == "output" else Plan(0, header["row_counts"])
            return ShardedMatrix(self, header["keep_id"], (m, n), out_dtype, plan, None, kind)
        if sink.is_file:
            attrs = sinks.describe("matmul", {"a": (getattr(a, "name", None), header["a_shape"]),
                                              "b": (getattr(b, "name", None), b_shape)},
                                   out_dtype, b_plan.axis, b_plan.counts)
            attrs.update(transpose_a=transpose_a, transpose_b=transpose_b)
            return sinks.deliver(sink, result.reshape(*lead, n), out_dtype, attrs, "matmul")
        return to_user(result.reshape(*lead, n), out_dtype, kind)

    def _place_a(self, a: Any, b_plan: Plan, mode: str, transpose_a: bool, header: dict,
                 op_b_shape: tuple[int, int]) -> tuple:
        """Validate op(a) against op(b), decide how it reaches the ranks, fill the a_* fields."""
        if isinstance(a, Matrix):
            self._check_live(a, "a")
            if getattr(a, "quant", None):
                raise InputError("a: a quantised matrix can only be the weight b of a matmul")
            check_inner(a.shape, transpose_a, op_b_shape, header["transpose_b"])
            a_axis = 0 if transpose_a else 1  # a's stored axis that op(a) contracts over
            if (mode == "contraction" and isinstance(a, ShardedMatrix) and a.axis == a_axis
                    and a.counts == b_plan.counts) or (
                    mode == "output" and isinstance(a, ReplicatedMatrix)):
                header.update(a_src="resident", a_id=a.id, a_shape=a.shape)
                return None, (a.shape[1] if transpose_a else a.shape[0],), a.kind, a.dtype, transpose_a
            a = self.gather(a)  # comes back as numpy or torch, like its source
        host = from_user(a, "a")
        data = host.data
        if data.ndim == 0 or 0 in data.shape:
            raise InputError(f"a: expected a non-empty matrix or vector, got shape {host.shape}")
        if data.ndim != 2 and transpose_a:
            raise InputError(f"a: transpose_a needs a 2-D a, got shape {host.shape}")
        if data.ndim == 1:
            lead: tuple = ()
            data = data.reshape(1, -1)
        elif data.ndim > 2:
            lead = data.shape[:-1]
            data = data.reshape(-1, data.shape[-1])
        else:
            lead = (data.shape[1] if transpose_a else data.shape[0],)
            if not data.flags.c_contiguous and data.T.flags.c_contiguous:
                data, transpose_a = data.T, not transpose_a  # a transposed view: flip the flag
        data = np.ascontiguousarray(data)
        self._check_dtype(host.dtype)
        check_inner(data.shape, transpose_a, op_b_shape, header["transpose_b"])
        src = "bcast" if mode == "output" else "scatter"
        header.update(a_src=src, a_shape=data.shape, a_dtype=host.dtype,
                      a_axis=(0 if transpose_a else 1) if src == "scatter" else None)
        return data, lead, host.kind, host.dtype, transpose_a

    def add(self, a: Any, b: Any, out: str | None = None, transpose_a: bool = False,
            transpose_b: bool = False) -> Any:
        """``op(a) + op(b)`` shard-wise (op transposes when its flag is set; op(a) and
        op(b) sharded alike; arrays are sharded on the fly)."""
        return elementwise.run(self, "add", a, b, out, transpose_a, transpose_b)

    def sub(self, a: Any, b: Any, out: str | None = None, transpose_a: bool = False,
            transpose_b: bool = False) -> Any:
        """``op(a) - op(b)`` shard-wise, like :meth:`add`."""
        return elementwise.run(self, "sub", a, b, out, transpose_a, transpose_b)

    def gather(self, m: Matrix) -> Any:
        """The whole matrix ``m`` on the driver, as numpy or torch like its source."""
        self._check_live(m, "m")
        if isinstance(m, ReplicatedMatrix):  # the driver holds a copy: no command needed
            data = self._rt.backend.download(self._rt.block(m.id), m.dtype).copy()
        else:
            data = self._run({"op": "gather", "id": m.id, "shape": m.shape, "dtype": m.dtype,
                              "axis": m.axis, "counts": m.counts})
        return to_user(data, m.dtype, m.kind)

    def free(self, m: Matrix | str, disk: bool = False) -> None:
        """Release ``m`` (a handle, or the name of a cached matrix: all its handles)
        on every rank; ``disk=True`` also deletes the cache files of its name."""
        if isinstance(m, str):
            handles = [h for h in self._named.get(m, ()) if not h.freed]
            if not handles and not disk:
                raise InputError(f"m: no cached matrix named {m!r} is resident; pass disk=True "
                                 "to delete its files")
            caching.free_cached(self, cache_mod.check_name(m), handles, disk)
            return
        if disk:
            if not isinstance(m, Matrix) or m._cluster is not self:
                raise InputError(f"m: expected a matrix handle from this cluster, got {type(m).__name__}")
            if not m.cached:
                raise InputError("disk=True: this matrix was not sharded with cache=..., it has no files")
            caching.free_cached(self, m.name, [m], disk=True)
            return
        self._check_live(m, "m")
        m.free()

    def cached(self) -> caching.CacheListing:
        """What every rank holds of the cache: name, shape, dtype, bytes in memory and on disk."""
        return caching.listing(self)

    # ---- plumbing ------------------------------------------------------------------

    def probe(self) -> list[dict]:
        """Every rank tries every backend: device, memory and fallback, or why it cannot load."""
        names, threads, accel = self._config or (None, None, None)
        return self._run({"op": "probe", "threads": threads, "backends": names, "accel": accel})

    def stats(self) -> dict[str, int]:
        """Commands sent and bytes of array data moved between ranks so far."""
        return {"commands": self._comm.commands, "bytes_moved": self._comm.bytes_moved}

    def shutdown(self, status: int = 0) -> None:
        """Tell every worker to exit with ``status``; the cluster is unusable afterwards."""
        if self._closed:
            return
        if self._busy:
            raise CMatrixError("cannot shut down while a cluster operation is running")
        self._closed = True
        self._comm.send_header({"op": "shutdown", "status": int(status)})

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _check_live(self, m: Matrix, arg: str) -> None:
        if not isinstance(m, Matrix) or m._cluster is not self:
            raise InputError(f"{arg}: expected a matrix handle from this cluster, got {type(m).__name__}")
        if m.freed:
            raise InputError(f"{arg}: {m!r} was freed")

    def _free_now(self, ids: list[int]) -> None:
        if self._closed:
            return
        if self._busy:  # a finalizer ran in the middle of a command: free with the next one
            self._pending_free.extend(ids)
            return
        self._run({"op": "free", "ids": ids})

    def _free_later(self, ident: int) -> None:
        # Called from __del__: only note it; the next command carries it.
        self._pending_free.append(ident)

    def _run(self, header: dict, payload: Any = None) -> Any:
        if self._closed:
            raise ClusterClosedError("the cluster was shut down")
        if self._busy:
            raise CMatrixError(f"cannot start {header['op']!r} while another cluster operation "
                               "is running (from a finalizer or a second thread)")
        if self._pending_free:
            header["free"] = list(self._pending_free)
        message = self._comm.encode_header(header)  # fails, if at all, before any MPI call
        self._pending_free.clear()
        self._busy = True
        try:
            self._comm.send_encoded(message)
            return self._rt.execute(header, payload)
        except RankError:
            # Ranks that got past their store step hold a block no handle will free.
            self._pending_free.extend(i for i in (header.get("id"), header.get("keep_id")) if i)
            raise
        except BaseException:
            # The driver failed outside a step: workers may be inside a collective
            # it will never join. Ending the job is the only way not to hang.
            print(f"cmatrix: the driver failed inside {header['op']!r}; aborting the job",
                  file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            self._comm.abort(1)
        finally:
            self._busy = False

