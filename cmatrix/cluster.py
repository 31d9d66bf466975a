"""The driver's view of the cluster, and ``init()`` which starts every rank.

Rank 0 (the driver) runs the user's program; every :class:`Cluster` method
validates its arguments first, so bad input is refused before any data moves,
then announces one command that all ranks run together (see :mod:`.ops`).
"""

from __future__ import annotations

import atexit
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import __version__, backends, ops  # noqa: F401 - ops registers the commands
from .arrays import HostArray, check_matrix, from_user, to_user
from .dtypes import promote
from .errors import ClusterClosedError, InputError, RankError
from .matrix import Matrix, ReplicatedMatrix, ShardedMatrix
from .plan import Plan, equal_weights, validate_weights
from .ranks import RankInfo, RankTable
from .runtime import Runtime, serve


class Cluster:
    """Handle the driver uses to shard matrices and run operations on all ranks."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._comm = runtime.comm
        self._next_id = 1
        self._pending_free: list[int] = []
        self._closed = False
        self.exit_status = 0
        self.weights = equal_weights(self.size)
        self.ranks = RankTable([])
        self._config: tuple | None = None

    @property
    def size(self) -> int:
        """Number of ranks (device slots), driver included."""
        return self._comm.size

    # ---- set-up ----------------------------------------------------------------

    def configure(self, weights: Sequence[float] | None = None,
                  backends_: str | Sequence[str] | None = None,
                  threads: int | None = None, accel: bool | Sequence[bool] | None = None) -> None:
        names = self._per_rank(backends_ if backends_ is not None else "numpy", "backends")
        names = [backends.canonical(n) for n in names]
        accel_list = [bool(a) for a in self._per_rank(True if accel is None else accel, "accel")]
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads: expected a positive integer, got {threads!r}")
        w = equal_weights(self.size) if weights is None else validate_weights(weights, self.size)
        config = (tuple(names), threads, tuple(accel_list))
        if self._config is not None and config != self._config:
            raise InputError("init(): the cluster is already running with backends "
                             f"{list(self._config[0])}; start a new job to change backends")
        self.weights = w
        if self._config is None:
            header = {"op": "configure", "version": __version__, "backends": names,
                      "threads": threads, "accel": accel_list}
            infos = self._run(header)
            self._check_versions(infos)
            self._config = config
            self._infos = infos
        self.ranks = RankTable([
            RankInfo(rank=i["rank"], host=i["host"], local_rank=i["local_rank"],
                     local_size=i["local_size"], backend=i["backend"], device=i["device"],
                     weight=float(self.weights[i["rank"]]), threads=i["threads"],
                     fallback=i.get("fallback"), versions=i["versions"])
            for i in self._infos
        ])

    def _per_rank(self, value: Any, arg: str) -> list:
        if isinstance(value, (str, bool)) or not isinstance(value, Sequence):
            return [value] * self.size
        if len(value) != self.size:
            raise InputError(f"{arg}: needs one entry per rank ({self.size} ranks), "
                             f"got {len(value)}: {list(value)}")
        return list(value)

    def _check_versions(self, infos: list[dict]) -> None:
        for key in ("numpy", "mpi"):
            seen = {i["versions"][key] for i in infos}
            if len(seen) > 1:
                detail = ", ".join(f"rank {i['rank']}: {i['versions'][key]}" for i in infos)
                raise InputError(f"ranks run different {key} versions ({detail}); "
                                 "install the same environment on every host")

    # ---- data placement ----------------------------------------------------------

    def shard(self, w: Any, name: str | None = None, weights: Sequence[float] | None = None,
              axis: int = 1) -> ShardedMatrix:
        """Split ``w`` along ``axis`` (1: columns, 0: rows) in proportion to
        ``weights`` (default: the cluster's) and keep each block resident on its rank."""
        if isinstance(w, Matrix):
            raise InputError("w: already on the cluster; shard() takes an array, tensor or path")
        host = from_user(w, "w")
        check_matrix(host, "w")
        if axis not in (0, 1):
            raise InputError(f"axis: must be 0 (split rows) or 1 (split columns), got {axis!r}")
        shares = self.weights if weights is None else validate_weights(weights, self.size)
        plan = Plan.from_weights(host.shape[axis], shares, axis)
        return self._shard_host(host, plan, name)

    def replicate(self, x: Any, name: str | None = None) -> ReplicatedMatrix:
        """Send ``x`` whole to every rank and keep it resident (for reuse across calls)."""
        host = from_user(x, "x")
        check_matrix(host, "x")
        ident = self._new_id()
        self._run({"op": "replicate", "id": ident, "shape": host.shape, "dtype": host.dtype},
                  np.ascontiguousarray(host.data))
        return ReplicatedMatrix(self, ident, host.shape, host.dtype, name, host.kind)

    def _shard_host(self, host: HostArray, plan: Plan, name: str | None = None) -> ShardedMatrix:
        ident = self._new_id()
        header = {"op": "shard", "id": ident, "shape": host.shape, "dtype": host.dtype,
                  "axis": plan.axis, "counts": plan.counts}
        self._run(header, np.ascontiguousarray(host.data))
        return ShardedMatrix(self, ident, host.shape, host.dtype, plan, name, host.kind)

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
        keep = self._check_out(out)
        transpose_a, transpose_b = bool(transpose_a), bool(transpose_b)
        host_b = None
        if isinstance(b, ShardedMatrix):
            self._check_live(b, "b")
            b_shape, b_plan, b_dtype, b_kind = b.shape, b.plan, b.dtype, b.kind
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
            a, b_plan, mode, transpose_a, header)
        m, k_a = header["a_shape"][::-1] if transpose_a else header["a_shape"]
        if k_a != k_b:
            raise InputError(
                f"matmul: inner dimensions differ: op(a) is {m}x{k_a} "
                f"(transpose_a={transpose_a}) but op(b) is {k_b}x{n} "
                f"(transpose_b={transpose_b})")
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
        return to_user(result.reshape(*lead, n), out_dtype, kind)

    def _place_a(self, a: Any, b_plan: Plan, mode: str, transpose_a: bool,
                 header: dict) -> tuple:
        """Decide how op(a) reaches the ranks; fill the header's a_* fields."""
        a_axis = 0 if transpose_a else 1  # a's stored axis that op(a) contracts over
        if isinstance(a, ShardedMatrix):
            self._check_live(a, "a")
            if mode == "contraction" and a.axis == a_axis and a.counts == b_plan.counts:
                header.update(a_src="resident", a_id=a.id, a_shape=a.shape)
                return None, (a.shape[1] if transpose_a else a.shape[0],), a.kind, a.dtype, transpose_a
            a = _Gathered(self.gather(a), a.kind)
        if isinstance(a, ReplicatedMatrix):
            self._check_live(a, "a")
            if mode == "output":
                header.update(a_src="resident", a_id=a.id, a_shape=a.shape)
                return None, (a.shape[1] if transpose_a else a.shape[0],), a.kind, a.dtype, transpose_a
            a = _Gathered(self.gather(a), a.kind)
        host = from_user(a.value, "a") if isinstance(a, _Gathered) else from_user(a, "a")
        if isinstance(a, _Gathered):
            host.kind = a.kind
        data = host.data
        if data.ndim == 0 or 0 in data.shape:
            raise InputError(f"a: expected a non-empty matrix or vector, got shape {host.shape}")
        if data.ndim == 1:
            lead: tuple = ()
            data = data.reshape(1, -1)
        elif data.ndim > 2:
            if transpose_a:
                raise InputError(f"a: transpose_a needs a 2-D a, got shape {host.shape}")
            lead = data.shape[:-1]
            data = data.reshape(-1, data.shape[-1])
        else:
            lead = (data.shape[1] if transpose_a else data.shape[0],)
            if not data.flags.c_contiguous and data.T.flags.c_contiguous:
                data, transpose_a = data.T, not transpose_a  # a transposed view: flip the flag
        data = np.ascontiguousarray(data)
        src = "bcast" if mode == "output" else "scatter"
        header.update(a_src=src, a_shape=data.shape, a_dtype=host.dtype,
                      a_axis=(0 if transpose_a else 1) if src == "scatter" else None)
        return data, lead, host.kind, host.dtype, transpose_a

    def add(self, a: Any, b: Any, out: str | None = None) -> Any:
        """``a + b`` shard-wise (operands sharded alike; arrays are sharded on the fly)."""
        return self._elementwise("add", a, b, out)

    def sub(self, a: Any, b: Any, out: str | None = None) -> Any:
        """``a - b`` shard-wise (operands sharded alike; arrays are sharded on the fly)."""
        return self._elementwise("sub", a, b, out)

    def _elementwise(self, kind: str, a: Any, b: Any, out: str | None) -> Any:
        keep = self._check_out(out)
        temporary: list[Matrix] = []
        try:
            for arg, x in (("a", a), ("b", b)):
                if isinstance(x, ReplicatedMatrix):
                    raise InputError(f"{arg}: {kind} works shard-wise; pass a sharded matrix or an array")
                if isinstance(x, ShardedMatrix):
                    self._check_live(x, arg)
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
            plan = ref.plan if ref is not None else Plan.from_weights(shape_a[0], self.weights, 0)
            placed = {}
            for arg, host in hosts.items():
                placed[arg] = self._shard_host(host, plan)
                temporary.append(placed[arg])
            ma, mb = placed.get("a", a), placed.get("b", b)
            out_dtype = promote(ma.dtype, mb.dtype)
            result_kind = "torch" if "torch" in (ma.kind, mb.kind) else "numpy"
            keep_id = self._new_id() if keep else None
            result = self._run({"op": "elementwise", "kind": kind, "a": ma.id, "b": mb.id,
                                "shape": shape_a, "axis": plan.axis, "counts": plan.counts,
                                "out_dtype": out_dtype, "keep_id": keep_id})
            if keep:
                return ShardedMatrix(self, keep_id, shape_a, out_dtype, plan, None, result_kind)
            return to_user(result, out_dtype, result_kind)
        finally:
            for t in temporary:
                t.free()

    def gather(self, m: Matrix) -> Any:
        """The whole matrix ``m`` on the driver, as numpy or torch like its source."""
        self._check_live(m, "m")
        if isinstance(m, ReplicatedMatrix):
            data = self._rt.backend.download(self._rt.block(m.id), m.dtype)
        else:
            data = self._run({"op": "gather", "id": m.id, "shape": m.shape, "dtype": m.dtype,
                              "axis": m.axis, "counts": m.counts})
        return to_user(data, m.dtype, m.kind)

    def free(self, m: Matrix) -> None:
        """Release ``m`` on every rank."""
        m.free()

    # ---- plumbing ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Commands sent and bytes of array data moved between ranks so far."""
        return {"commands": self._comm.commands, "bytes_moved": self._comm.bytes_moved}

    def shutdown(self, status: int = 0) -> None:
        """Tell every worker to exit with ``status``; the cluster is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        self._comm.send_header({"op": "shutdown", "status": int(status)})

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    @staticmethod
    def _check_out(out: str | None) -> bool:
        if out is None:
            return False
        if out == "keep":
            return True
        raise InputError(f"out: expected None (result to the driver) or 'keep' (stay "
                         f"distributed), got {out!r}")

    @staticmethod
    def _check_live(m: Matrix, arg: str) -> None:
        if m.freed:
            raise InputError(f"{arg}: {m!r} was freed")

    def _free_now(self, ids: list[int]) -> None:
        if not self._closed:
            self._run({"op": "free", "ids": ids})

    def _free_later(self, ident: int) -> None:
        # Called from __del__: only note it; the next command carries it.
        self._pending_free.append(ident)

    def _run(self, header: dict, payload: Any = None) -> Any:
        if self._closed:
            raise ClusterClosedError("the cluster was shut down")
        pending, self._pending_free = self._pending_free, []
        if pending:
            header["free"] = pending
        self._comm.send_header(header)
        try:
            return self._rt.execute(header, payload)
        except RankError:
            raise
        except BaseException:
            # The driver failed outside a step: workers may be inside a collective
            # it will never join. Ending the job is the only way not to hang.
            print(f"cmatrix: the driver failed inside {header['op']!r}; aborting the job",
                  file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            self._comm.abort(1)


class _Gathered:
    """An operand that had to be collected on the driver before use."""

    def __init__(self, value: Any, kind: str) -> None:
        self.value, self.kind = value, kind


_runtime: Runtime | None = None
_cluster: Cluster | None = None


def connect() -> Runtime:
    """Start MPI on this rank (once) and return its runtime."""
    global _runtime
    if _runtime is None:
        from .comm import Comm

        _runtime = Runtime(Comm())
    return _runtime


def init(weights: Sequence[float] | None = None, backends: str | Sequence[str] | None = None,
         threads: int | None = None, accel: bool | Sequence[bool] | None = None) -> Cluster:
    """Join the cluster. On the driver (rank 0) return the :class:`Cluster`;
    on every other rank serve the driver's commands, then exit the process.

    ``weights``: per-rank shares summing to 1 (default equal). ``backends``: a
    backend name for all ranks or one per rank (default "numpy"). ``threads``:
    CPU threads per rank (default: CMATRIX_THREADS, else a fair share of the
    host's cores). ``accel``: False for a backend's plain CPU path.
    """
    global _cluster
    rt = connect()
    if not rt.comm.is_driver:
        sys.exit(serve(rt))
    if _cluster is None:
        cluster = Cluster(rt)
        cluster.configure(weights, backends, threads, accel)
        _cluster = cluster
        atexit.register(_at_exit)
        _chain_excepthook()
    else:
        _cluster.configure(weights, backends, threads, accel)
    return _cluster


def _at_exit() -> None:
    if _cluster is not None:
        _cluster.shutdown(_cluster.exit_status)


def _chain_excepthook() -> None:
    previous = sys.excepthook

    def hook(*exc_info):  # an uncaught error on the driver ends the job non-zero
        if _cluster is not None:
            _cluster.exit_status = 1
        previous(*exc_info)

    sys.excepthook = hook
