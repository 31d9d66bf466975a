"""The seed's API (``cluster_matrix``) as a thin layer over the native one.

Scripts written for the seed run unchanged under ``mpirun`` (see
docs/seed-migration.md for each call's native equivalent)::

    A = cluster_matrix(matrix_file_path=x, node_IP_list=ips, CPU_GPU_select_list=gpu,
                       node_percentages=pct, back_end_select_list=be,
                       split_matrix=False, auto_set_up=[1, "save"])
    B = cluster_matrix(matrix_file_path="w.pt", ..., split_matrix=True, dim=1,
                       auto_set_up=[1, "load"])
    y = A.cluster_shard_operation(B, True, False, True)      # op(A) @ op(B) as a tensor

``auto_set_up=[system, action]``: system 1 keeps split matrices resident
(``split_matrix=True`` -> sharded along ``dim``, else replicated on every
rank); system 2 is grid mode (both operands in 2-D blocks at each operation,
see docs/grid-mode.md). Actions: ``"save"`` sends (a split matrix is also
written to each node's disk cache), ``"load"`` reuses the node caches,
``"saveC"``/``"loadC"`` also keep the matrix under ``matrix_name`` for this job, and
``"loadC"`` falls back to the disk cache in a later job (the seed kept those shards on
the nodes' disks too). Grid mode holds its operands on the driver and sends their blocks
at each operation: ``[2, "load"]`` reads the file again, or takes the matrix a
``[2, "save"]`` of this job kept under its name.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from ..core.arrays import HostArray, to_user
from ..core.checks import check_axis
from ..errors import CacheError, InputError
from ..io import sinks, store
from ..io.store import from_user
from ..ops.handles import Matrix, ShardedMatrix, deliver
from . import setup
from .nodeops import SeedNodeOps
from .values import as_matrix, as_tensor, heads_layout, seed_layout

SYSTEMS = (1, 2)
ACTIONS = ("save", "load", "saveC", "loadC", "auto")
OPERATIONS = ("mul", "add", "sub")

#: matrices kept with "saveC", by name, for "loadC" in the same job
_in_ram: dict[str, Matrix] = {}


def _parse_setup(auto_set_up: Any) -> tuple[int, str]:
    if auto_set_up is None:
        return 1, "save"
    if isinstance(auto_set_up, (list, tuple)) and len(auto_set_up) == 2 and \
            auto_set_up[0] in SYSTEMS and auto_set_up[1] in ACTIONS:
        return int(auto_set_up[0]), str(auto_set_up[1])
    raise InputError(f"auto_set_up: expected [system, action] with system 1 (split/full) or 2 (grid) "
                     f"and action one of {', '.join(map(repr, ACTIONS))}, e.g. [1, 'save']; "
                     f"got {auto_set_up!r}")


def _default_name(data: Any) -> str | None:
    """A cache name for a file: its stem plus a hash of its full path and key, so that
    ``layers/0/gate.pt`` and ``layers/1/gate.pt`` never share a cache entry."""
    if isinstance(data, (str, os.PathLike)):
        path, _, key = str(data).partition("#")
        stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(path).stem).strip(".")[:150] or "matrix"
        where = f"{Path(path).expanduser().resolve()}#{key}"
        return f"{stem}-{hashlib.sha256(where.encode()).hexdigest()[:10]}"
    return None


def _seq_of(*kinds: type) -> Any:
    def check(x: Any) -> bool:
        return isinstance(x, (list, tuple)) and all(isinstance(v, kinds) and
                                                    (bool in kinds or not isinstance(v, bool)) for v in x)
    return check


#: what the earlier form's 2nd..6th positional arguments are, found one slot to the right
_SHIFTED = (_seq_of(bool), _seq_of(int, float), _seq_of(str), lambda x: isinstance(x, bool),
            lambda x: isinstance(x, int) and not isinstance(x, bool))


def _old_positional(zmq: Any, ips: Any, accel: Any, pct: Any, backends_: Any, split: Any, dim: Any
                    ) -> tuple:
    """The earlier call form, ``cluster_matrix(path, node_IP_list, CPU_GPU_select_list,
    node_percentages, back_end_select_list, split_matrix, dim)``, passed by position, lands one
    parameter to the right of the current one (``cluster_zmq_object`` came second later):
    shift back the arguments that were passed by position (the leading ones of the earlier
    form's types), keep the keywords where they are."""
    if not isinstance(zmq, (list, tuple)):
        return zmq, ips, accel, pct, backends_, bool(split), 0 if dim is None else dim
    slots = [ips, accel, pct, backends_, split]
    n = 0
    while n < len(slots) and slots[n] is not None and _SHIFTED[n](slots[n]):
        n += 1
    positional = [list(zmq), *slots[:n]]  # the earlier form's first n + 1 arguments
    keywords = [None, accel, pct, backends_, split, dim]  # each parameter under its own name
    ips_, accel_, pct_, backends__, split_, dim_ = (positional[k] if k <= n else keywords[k]
                                                    for k in range(6))
    return None, ips_, accel_, pct_, backends__, bool(split_), 0 if dim_ is None else dim_


class cluster_matrix(SeedNodeOps):  # noqa: N801 - the seed's name, kept so its scripts run unchanged
    """A matrix on the cluster, created the seed's way (see the module docstring).

    The cluster is ``cluster_zmq_object`` (``cluster_zmq(IP_list)``), or made from
    ``node_IP_list``; the lists left out take its defaults ("llama", the accelerator on),
    except ``node_percentages``: left out (or ``"auto"``) the shares follow each rank's
    measured speed (see ``cmatrix bench``). ``matrix_labeling`` ('a'/'b': grid mode's operand)
    is accepted and not needed. ``save_bin_matrix=False`` keeps a named matrix off the nodes' disks.
    """

    def __init__(self, matrix_file_path: Any, cluster_zmq_object: Any = None,
                 node_IP_list: list[str] | None = None, CPU_GPU_select_list: list[bool] | None = None,  # noqa: N803
                 node_percentages: list[float] | str | None = None,
                 back_end_select_list: list[str] | None = None, split_matrix: bool | None = None,
                 dim: int | None = None,
                 matrix_name: str | None = None, matrix_labeling: str = "", auto_set_up: Any = None,
                 save_bin_matrix: bool = True) -> None:
        (cluster_zmq_object, node_IP_list, CPU_GPU_select_list, node_percentages, back_end_select_list,
         split_matrix, dim) = _old_positional(cluster_zmq_object, node_IP_list, CPU_GPU_select_list,
                                              node_percentages, back_end_select_list, split_matrix, dim)
        if matrix_labeling not in ("", "a", "b"):
            raise InputError(f"matrix_labeling: '', 'a' or 'b' (grid mode's operands), "
                             f"got {matrix_labeling!r}")
        if cluster_zmq_object is None:
            if node_IP_list is None:
                raise InputError("pass cluster_zmq_object=cluster_zmq(IP_list), or node_IP_list=[...] "
                                 "with one host per rank")
            cluster_zmq_object = setup.cluster_zmq(node_IP_list)
        elif not isinstance(cluster_zmq_object, setup.cluster_zmq):
            raise InputError(f"cluster_zmq_object: expected cluster_zmq(IP_list), got "
                             f"{type(cluster_zmq_object).__name__}")
        z = cluster_zmq_object
        self.cluster_zmq_object = z
        self.cluster, self.node_percentages = setup.connect(
            z.node_IP_list,
            z.default_CPU_GPU_select_list if CPU_GPU_select_list is None else CPU_GPU_select_list,
            "auto" if node_percentages is None else node_percentages,
            z.default_back_end_select_list if back_end_select_list is None else back_end_select_list)
        self.node_IP_list = list(z.node_IP_list)
        self.split_matrix = bool(split_matrix)
        name = matrix_name or _default_name(matrix_file_path)
        #: a [heads, tokens, head_dim] input is held as (tokens, heads * head_dim)
        matrix_file_path, self.head_dim, dim = heads_layout(matrix_file_path, self.split_matrix, dim)
        self.dim = check_axis(dim, "dim") if split_matrix else dim
        self.system, self.action = _parse_setup(auto_set_up)
        self.matrix_labeling, self.save_bin_matrix = matrix_labeling, bool(save_bin_matrix)
        self.matrix_name = name
        self.handle: Matrix | None = None
        self._host: HostArray | None = None
        if self.system == 2:
            if matrix_file_path is None and self.action in ("load", "loadC"):
                self._host = self._grid_kept()
            else:
                self._host = as_matrix(matrix_file_path)
            if matrix_name:  # an explicit name: a later [2, "load"] of this job may ask for it
                _in_ram[matrix_name] = self._host
        elif self.action == "loadC":
            self.handle = self._from_ram()
        else:
            self.handle = self._place(matrix_file_path)
        if self.action == "saveC":
            self._to_ram()

    @classmethod
    def _wrap(cls, parent: cluster_matrix, handle: Matrix) -> cluster_matrix:
        """A result kept on the cluster (``send_back=False``), shaped like a system 1 matrix."""
        obj = cls.__new__(cls)
        obj.cluster, obj.node_percentages = parent.cluster, parent.node_percentages
        obj.cluster_zmq_object, obj.matrix_labeling, obj.head_dim = parent.cluster_zmq_object, "", None
        obj.save_bin_matrix = False
        obj.node_IP_list, obj.system, obj.action = parent.node_IP_list, 1, "save"
        obj.split_matrix = isinstance(handle, ShardedMatrix)
        obj.dim = handle.axis if obj.split_matrix else 0
        obj.matrix_name, obj.handle, obj._host = None, handle, None
        return obj

    # ---- placement --------------------------------------------------------------------

    def _place(self, data: Any) -> Matrix:
        cl, name = self.cluster, self.matrix_name
        if not self.split_matrix:
            return cl.replicate(as_matrix(data), name=name)
        if self.action == "load" and name is None:
            raise InputError("matrix_name: auto_set_up [1, 'load'] reads the shards the nodes cached under "
                             "a name; pass matrix_name='...' (a file path gives one by default)")
        saving = self.action in ("save", "saveC") and self.save_bin_matrix
        cached = saving or self.action in ("load", "auto")
        if cached and name is not None:
            # "load" without data (or with the path of a file that is no longer here: the seed
            # loads by the name a path gives) takes shape, dtype and checksums from the cache's
            # manifest; with data, the shards' checksums are compared (a changed file is stale).
            gone = isinstance(data, (str, os.PathLike)) and not os.path.exists(store.split_spec(data)[0])
            weight = None if (data is None or gone) and self.action == "load" else as_matrix(data)
            return cl.shard(weight, name=name, weights=self.node_percentages, axis=self.dim,
                            cache="save" if self.action == "saveC" else self.action, align=self._align)
        # save_bin_matrix=False, or a tensor without a name: sent and kept resident, not cached on
        # disk (the seed README: "some tensors (e.g. token embeddings) cannot be cached").
        return cl.shard(as_matrix(data), name=name, weights=self.node_percentages, axis=self.dim,
                        align=self._align)

    @property
    def _align(self) -> int:
        """Whole heads per rank for a matrix in the attention layout."""
        return self.head_dim or 1

    def _to_ram(self) -> None:
        if self.matrix_name is None:
            raise InputError("matrix_name: auto_set_up [.., 'saveC'] keeps the matrix in RAM under a "
                             "name for a later 'loadC'; pass matrix_name='...'")
        _in_ram[self.matrix_name] = self.handle if self.handle is not None else self._host

    def _grid_kept(self) -> HostArray:
        held = _in_ram.get(self.matrix_name or "")
        if not isinstance(held, HostArray):
            raise CacheError(f"auto_set_up [2, {self.action!r}]: no grid matrix named {self.matrix_name!r} "
                             "was kept by this job; pass its file (grid mode sends the blocks at each "
                             "operation, nothing stays on the nodes)", [])
        return held

    def _from_ram(self) -> Matrix:
        held = _in_ram.get(self.matrix_name or "")
        if held is None or (isinstance(held, Matrix) and held.freed):
            if self.split_matrix and self.matrix_name:  # a later job: the shards on the nodes' disks
                self.action = "load"
                return self._place(None)
            raise CacheError(f"loadC: no matrix named {self.matrix_name!r} is held in RAM by this job; "
                             "create it first with auto_set_up [1, 'saveC'] (a full matrix is not kept "
                             "between jobs: use 'save'/'load' for the disk cache of a split one)", [])
        want_split = isinstance(held, ShardedMatrix)
        if want_split != self.split_matrix or (want_split and held.axis != self.dim):
            raise CacheError(f"loadC: {self.matrix_name!r} was saved with split_matrix={want_split}"
                             + (f", dim={held.axis}" if want_split else "")
                             + f"; this call asks split_matrix={self.split_matrix}, dim={self.dim}", [])
        return held

    # ---- the seed's operations --------------------------------------------------------------

    def cluster_shard_operation(self, other: cluster_matrix, TransposeA: bool = False,  # noqa: N803
                                TransposeB: bool = False, send_back: bool = True, op: str = "mul",  # noqa: N803
                                shm_name: str | None = None, inner: bool = False,
                                grid: tuple[int, int] | None = None, *, send_back_result: bool | None = None,
                                operation: str | None = None) -> Any:
        """``op(A) @ op(B)`` ("mul"), or shard-wise ``A ± B`` ("add"/"sub"), where A is this
        matrix, B is ``other`` and op transposes when its flag is set. For add/sub the flags
        apply only when A and B differ in shape (B stored transposed): operands of one shape
        are added as they are, as the seed's README means ``(B, False, True, True, "add")``.

        System 1: for "mul" B must be split; its pieces of the result are joined
        along the result's columns (B split along op(B)'s columns) or summed (B
        split along the inner dimension). "add"/"sub" need both split alike.
        System 2 (both grid mode): the grid product (``inner=True``: the variant
        that splits the inner dimension and sums partial products; ``grid``: the
        p x q shape, default the most square) or grid elementwise operation.
        ``send_back=True`` returns a torch tensor; False keeps the result on the
        cluster and returns a cluster_matrix whose :meth:`send_back` fetches it.
        ``shm_name`` also writes the result to ``/dev/shm/cmatrix/NAME.bin``.
        ``send_back_result`` and ``operation`` are the seed's names of ``send_back`` and ``op``.
        Single-node mode (one node, a product with B not split) returns the result whatever
        ``send_back`` says, as the seed does.
        """
        if send_back_result is not None:
            send_back = send_back_result
        if operation is not None:
            op = operation
        if not isinstance(other, cluster_matrix):
            raise InputError(f"B: expected a cluster_matrix, got {type(other).__name__}")
        if len(self.node_IP_list) == 1 and op == "mul" and self.system == other.system == 1 \
                and not other.split_matrix:
            send_back = True
        if op not in OPERATIONS:
            raise InputError(f"op: expected one of {', '.join(map(repr, OPERATIONS))}, got {op!r}")
        if not isinstance(other, cluster_matrix):
            raise InputError(f"B: expected a cluster_matrix, got {type(other).__name__}")
        if shm_name is not None and not send_back:
            raise InputError("shm_name: the result is written when it is sent back; pass it to "
                             "send_back(shm_name=...) of the kept result instead")
        ta, tb = bool(TransposeA), bool(TransposeB)
        if op != "mul" and tuple(self.shape) == tuple(other.shape):
            # The seed's flags on add/sub described how its GGML path laid B out (its README
            # and tests pass TransposeB=True for A + B): operands of one shape are added as
            # they are, so nothing transposes a square operand behind the user's back. Only
            # when the shapes agree after transposing (B stored transposed) do the flags apply.
            ta = tb = False
        if (self.system == 2) != (other.system == 2):
            raise InputError("grid mode: both matrices must be created with auto_set_up [2, ...]")
        out = f"shm:{shm_name}" if shm_name is not None else (None if send_back else "keep")
        if self.system != 2 and (inner or grid is not None):
            raise InputError("inner, grid: options of grid mode (auto_set_up [2, ...]) only")
        if self.system == 2:
            if not send_back:
                raise InputError("send_back: grid mode results are assembled on the driver; pass True")
            cl = self.cluster
            if op == "mul":
                result = cl.grid_matmul(self._host, other._host, ta, tb, grid=grid, inner=bool(inner),
                                        weights=self.node_percentages, out=out)
            else:
                if inner:
                    raise InputError(f"inner: {op} has no inner dimension; it is split in 2-D blocks")
                fn = cl.grid_add if op == "add" else cl.grid_sub
                result = fn(self._host, other._host, ta, tb, grid=grid, weights=self.node_percentages,
                            out=out)
            return self._returned(result, shm_name)
        if op == "mul":
            b = other.handle
            if not other.split_matrix:
                if len(self.node_IP_list) > 1:
                    raise InputError("B: in system 1 the second matrix must be split (split_matrix=True)")
                b = b.gather()  # one node holds everything: B is split (trivially) for this product
            result = self.cluster.matmul(self.handle, b, ta, tb, out=out)
        else:
            if not (self.split_matrix and other.split_matrix):
                raise InputError(f"{op}: both matrices must be split (split_matrix=True); it is "
                                 "performed shard-wise, C_i = A_i {} B_i".format("+" if op == "add" else "-"))
            fn = self.cluster.add if op == "add" else self.cluster.sub
            result = fn(self.handle, other.handle, out=out, transpose_a=ta, transpose_b=tb)
        if not send_back:
            return cluster_matrix._wrap(self, result)
        return self._returned(result, shm_name)

    @staticmethod
    def _returned(result: Any, shm_name: str | None) -> Any:
        if shm_name is not None:  # the file is the result; read it back as the seed's callers expect
            return store.convert_bin_matrix_to_pt(result)
        return as_tensor(result)

    def send_back(self, shm_name: str | None = None) -> Any:
        """The whole matrix on the driver as a torch tensor (and in /dev/shm with ``shm_name``)."""
        if self._host is not None:
            data = to_user(self._host.data, self._host.dtype, self._host.kind)
            return as_tensor(data)
        if shm_name is None:
            data = as_tensor(self.handle.gather())
            # a matrix in the attention layout comes back as the seed gives it: [H*T, D]
            return seed_layout(data, self.head_dim) if self.head_dim else data
        sink = sinks.parse(f"shm:{shm_name}")
        host = from_user(self.handle.gather(), "result")
        path = deliver(sink, "send_back", host.data, host.dtype, host.kind)
        return store.convert_bin_matrix_to_pt(path)

    def convert_bin_matrix_to_pt(self, path: str | os.PathLike, force_2d: bool = True,
                                 pt_path: str | os.PathLike | None = None) -> Any:
        """A ``.bin`` result file as a torch tensor (also saved as ``pt_path`` when given);
        ``force_2d`` (the seed's default) folds leading dimensions into the rows."""
        tensor = store.convert_bin_matrix_to_pt(path, pt_path)
        return tensor.reshape(-1, tensor.shape[-1]) if force_2d and tensor.dim() > 2 else tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.handle.shape if self.handle is not None else self._host.shape

    def __repr__(self) -> str:
        where = repr(self.handle) if self.handle is not None else f"grid-mode {self._host.shape}"
        return f"<cluster_matrix {self.matrix_name or ''} system {self.system}: {where}>"

