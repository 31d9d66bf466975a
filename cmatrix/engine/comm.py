"""MPI transport: the only module that imports mpi4py.

Array data moves with buffer calls (Bcast, Scatterv, Gatherv, Reduce, and
point-to-point Send/Recv with subarray datatypes where a rank's block is not
contiguous in the full matrix); pickle is used only for small command headers
and per-rank reports. A one-rank world never calls MPI for data.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import mpi4py
import numpy as np

# Only the main thread of a rank ever calls MPI; asking for less than
# THREAD_MULTIPLE avoids the library's internal locking on every call.
mpi4py.rc.thread_level = "funneled"
from mpi4py import MPI  # noqa: E402

from ..core.plan import Plan  # noqa: E402
from ..errors import CMatrixError  # noqa: E402
from .comm_grid import GridTransfers  # noqa: E402

HEADER_BYTES = 2048
_TAG_BLOCKS = 11
_TAG_HEADER_TAIL = 12
_TAG_HEADER = 13
_TAG_PIPE = 14
_TAG_REPORT = 15

# A waiting worker spins this long after each command (so back-to-back calls,
# as in LLM decoding, see no added latency), then sleeps with back-off so an
# idle cluster does not burn every core it runs on.
_IDLE_SPIN_S = float(os.environ.get("CMATRIX_IDLE_SPIN_MS", "20")) / 1e3
_IDLE_SLEEP_MAX_S = 0.002


def _mpi_type(dtype: np.dtype) -> MPI.Datatype:
    """MPI type that moves elements of ``dtype`` bit for bit."""
    by_size = {1: MPI.BYTE, 2: MPI.UINT16_T, 4: MPI.FLOAT, 8: MPI.DOUBLE}
    if dtype == np.float32:
        return MPI.FLOAT
    if dtype == np.float64:
        return MPI.DOUBLE
    return by_size[dtype.itemsize]


def _yielding_wait(request: MPI.Request) -> None:
    while not request.Test():
        os.sched_yield()


def library_version() -> str:
    return MPI.Get_library_version().splitlines()[0].strip()


class Comm(GridTransfers):
    """cmatrix's own duplicate of COMM_WORLD plus its same-host split."""

    def __init__(self) -> None:
        self.world = MPI.COMM_WORLD.Dup()
        self.rank = self.world.Get_rank()
        #: this rank in COMM_WORLD (a :class:`GroupComm` numbers its members afresh)
        self.world_rank = self.rank
        self.size = self.world.Get_size()
        self.local = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.local.Get_rank()
        self.local_size = self.local.Get_size()
        #: world ranks on this host, in local-rank order
        self.local_peers = tuple(self.local.allgather(self.rank))
        self.host = MPI.Get_processor_name()
        self._header = np.zeros(HEADER_BYTES, dtype=np.uint8)
        #: driver's count of commands sent and of array bytes that crossed ranks
        self.commands = 0
        self.bytes_moved = 0
        #: bytes of array data this rank has put into collectives (counted on every rank)
        self.bytes_sent = 0

    # What GridTransfers (comm_grid.py) needs of MPI, so that it need not import it.
    _typed = staticmethod(_mpi_type)
    _SUM = MPI.SUM

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @staticmethod
    def library_version() -> str:
        """The MPI library's name and version (every rank must run the same one)."""
        return library_version()

    # ---- command headers (pickled, small) ---------------------------------

    def send_header(self, header: dict) -> None:
        """Driver: announce the next command to every worker."""
        self.send_encoded(self.encode_header(header))

    @staticmethod
    def encode_header(header: dict) -> bytes:
        """Serialise a header without sending it (so a bad header fails before any MPI call)."""
        return pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)

    def send_encoded(self, payload: bytes) -> None:
        """Driver: the header goes to each worker directly (not down a broadcast tree), so no rank
        passes on another's: a rank with no part in a command, napping or held back by its
        kernel, delays nobody else's."""
        self.commands += 1
        if self.size == 1:
            return
        inline = min(len(payload), HEADER_BYTES - 8)
        self._header[:8] = np.frombuffer(np.int64(len(payload)).tobytes(), dtype=np.uint8)
        self._header[8 : 8 + inline] = np.frombuffer(payload[:inline], dtype=np.uint8)
        MPI.Request.Waitall([self.world.Isend(self._header, dest=r, tag=_TAG_HEADER)
                             for r in range(1, self.size)])
        if len(payload) > inline:
            tail = bytearray(payload[inline:])
            MPI.Request.Waitall([self.world.Isend(tail, dest=r, tag=_TAG_HEADER_TAIL)
                                 for r in range(1, self.size)])

    def recv_header(self, spin: bool = True) -> dict:
        """Worker: wait for the next command, spinning briefly (unless ``spin`` is False: a rank
        with no part in the commands that follow), then sleeping."""
        request = self.world.Irecv(self._header, source=0, tag=_TAG_HEADER)
        spin_until = time.perf_counter() + (_IDLE_SPIN_S if spin else 0.0)
        nap = 50e-6
        while not request.Test():
            if time.perf_counter() < spin_until:
                os.sched_yield()
            else:
                time.sleep(nap)
                nap = min(nap * 2, _IDLE_SLEEP_MAX_S)
        length = int(self._header[:8].view(np.int64)[0])
        inline = min(length, HEADER_BYTES - 8)
        payload = bytearray(self._header[8 : 8 + inline].tobytes())
        if length > inline:
            tail = bytearray(length - inline)
            self.world.Recv(tail, source=0, tag=_TAG_HEADER_TAIL)
            payload += tail
        return pickle.loads(payload)

    # ---- agreement and small reports --------------------------------------

    def any_failed(self, failed: bool) -> bool:
        """Collective: True on every rank if any rank passed ``failed=True``."""
        if self.size == 1:
            return failed
        flag = np.array([1 if failed else 0], dtype=np.int32)
        self.world.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
        return bool(flag[0])

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Small per-rank reports to the driver (None on workers)."""
        if self.size == 1:
            return [obj]
        return self.world.gather(obj, root=0)

    def group(self, member: bool) -> GroupComm | None:
        """Collective: a communicator of the ranks passing ``member=True`` (the driver must be
        one; they keep their order), or None on the others. Collectives on it leave the others
        alone: a rank with no work need not join every step."""
        return self.split(0 if member else None)

    def split(self, color: int | None) -> GroupComm | None:
        """Collective: one communicator per ``color`` (ranks keep their order), None where
        ``color`` is None."""
        sub = self.world.Split(MPI.UNDEFINED if color is None else color, key=self.rank)
        return None if sub == MPI.COMM_NULL else GroupComm(self, sub)

    # ---- point to point (pipeline stages, link probes) ----------------------

    def send(self, array: np.ndarray, dest: int, tag: int = _TAG_PIPE) -> None:
        """``array`` to rank ``dest`` of this communicator."""
        self._count(array.nbytes)
        self.bytes_sent += array.nbytes
        self.world.Send([array, _mpi_type(array.dtype)], dest=dest, tag=tag)

    def recv(self, array: np.ndarray, source: int, tag: int = _TAG_PIPE) -> None:
        """Into ``array``, what rank ``source`` sent with :meth:`send`. The wait yields the core
        (a pipeline stage waits for the one before it: on a shared core, its turn comes sooner)."""
        _yielding_wait(self.world.Irecv([array, _mpi_type(array.dtype)], source=source, tag=tag))

    def send_object(self, obj: Any, dest: int) -> None:
        """A small report (pickled) to rank ``dest``."""
        self.world.send(obj, dest=dest, tag=_TAG_REPORT)

    def recv_object(self, source: int) -> Any:
        """What rank ``source`` sent with :meth:`send_object` (ranks of this job only)."""
        return self.world.recv(source=source, tag=_TAG_REPORT)

    def abort(self, code: int = 1) -> None:
        """End the whole job now: used only when ranks can no longer agree."""
        MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # Abort may return before the launcher kills us; never run on

    # ---- array data ---------------------------------------------------------

    def bcast(self, array: np.ndarray, yielding: bool = False) -> None:
        """Broadcast the driver's ``array`` into the same-shaped arrays of the workers
        (``yielding``: waiting ranks give up their core while they wait, see :meth:`recv`)."""
        if self.size > 1:
            self._count(array.nbytes * (self.size - 1))
            if self.is_driver:
                self.bytes_sent += array.nbytes
            if yielding:
                _yielding_wait(self.world.Ibcast([array, _mpi_type(array.dtype)], root=0))
            else:
                self.world.Bcast([array, _mpi_type(array.dtype)], root=0)

    def scatter_blocks(self, full: np.ndarray | None, block: np.ndarray, plan: Plan,
                       skip: tuple[bool, ...] | None = None) -> None:
        """Driver's 2-D ``full`` -> each rank's ``block`` along ``plan.axis``.

        ``skip[r]``: rank r already holds its block (a reused cache); nothing is sent to it.
        """
        skip = skip or (False,) * self.size
        if self.size == 1:
            if not skip[0]:
                block[...] = full
            return
        counts = tuple(0 if s else c for s, c in zip(skip, plan.counts, strict=True))
        self._count_blocks(full, Plan(plan.axis, counts))
        mpitype = _mpi_type(block.dtype)
        if self._contiguous_blocks(block.shape, plan):
            recv = block.reshape(-1)[:0] if skip[self.rank] else block
            spec = self._vector_spec(full, plan, mpitype, counts)
            self.world.Scatterv(spec, [recv, mpitype], root=0)
        elif not self.is_driver:
            if block.size and not skip[self.rank]:
                self.world.Recv([block, mpitype], source=0, tag=_TAG_BLOCKS)
        else:
            if not skip[0]:
                block[...] = full[:, plan.block(0)]
            self._subarray_transfers(full, plan, mpitype, self.world.Isend, counts)

    def scatter_rows(self, full: np.ndarray | None, rows: np.ndarray, counts: list[int],
                     displs: list[int]) -> None:
        """Driver's rows ``displs[r]:displs[r]+counts[r]`` of ``full`` -> rank r's ``rows``."""
        if self.size == 1:
            rows[...] = full[displs[0] : displs[0] + counts[0]]
            return
        mpitype = _mpi_type(rows.dtype)
        if self.is_driver:
            unit = full.shape[1]
            self._count((sum(counts) - counts[0]) * unit * full.itemsize)
            spec = [full, [c * unit for c in counts], [d * unit for d in displs], mpitype]
        else:
            spec = None
        self.world.Scatterv(spec, [rows, mpitype], root=0)

    def gather_blocks(self, block: np.ndarray, full: np.ndarray | None, plan: Plan,
                      yielding: bool = False) -> None:
        """Each rank's ``block`` -> the driver's 2-D ``full``, in plan order (``yielding``: a
        rank waiting for the others gives up its core meanwhile, see :meth:`recv`)."""
        if self.size == 1:
            full[...] = block
            return
        self._count_blocks(full, plan)
        if not self.is_driver:
            self.bytes_sent += block.nbytes
        mpitype = _mpi_type(block.dtype)
        if self._contiguous_blocks(block.shape, plan):
            spec = self._vector_spec(full, plan, mpitype)
            if yielding:
                _yielding_wait(self.world.Igatherv([block, mpitype], spec, root=0))
            else:
                self.world.Gatherv([block, mpitype], spec, root=0)
        elif not self.is_driver:
            if block.size:
                self.world.Send([block, mpitype], dest=0, tag=_TAG_BLOCKS)
        else:
            full[:, plan.block(0)] = block
            self._subarray_transfers(full, plan, mpitype, self.world.Irecv)

    def reduce_sum(self, partial: np.ndarray, total: np.ndarray | None) -> None:
        """Sum every rank's float32 ``partial`` into the driver's ``total``."""
        if self.size == 1:
            total[...] = partial
            return
        self._count(partial.nbytes * (self.size - 1))
        mpitype = _mpi_type(partial.dtype)
        self.world.Reduce([partial, mpitype], [total, mpitype] if self.is_driver else None,
                          op=MPI.SUM, root=0)

    def allreduce(self, array: np.ndarray, op: str = "sum") -> None:
        """Combine every rank's ``array`` in place (``op``: "sum" or "max"); all ranks get the result."""
        if self.size == 1:
            return
        self._count(array.nbytes * (self.size - 1))
        self.bytes_sent += array.nbytes
        mpi_op = {"sum": MPI.SUM, "max": MPI.MAX}[op]
        self.world.Allreduce(MPI.IN_PLACE, [array, _mpi_type(array.dtype)], op=mpi_op)

    def allgather(self, array: np.ndarray, out: np.ndarray) -> None:
        """Every rank's ``array`` into row r of ``out`` (size, *array.shape) on every rank."""
        if self.size == 1:
            out[0] = array
            return
        self._count(array.nbytes * (self.size - 1))
        self.bytes_sent += array.nbytes
        mpitype = _mpi_type(array.dtype)
        self.world.Allgather([array, mpitype], [out, mpitype])

    def reduce_scatter_rows(self, partial: np.ndarray, block: np.ndarray, plan: Plan) -> None:
        """Sum every rank's ``partial`` and leave row block ``plan.block(rank)`` on each rank."""
        if self.size == 1:
            block[...] = partial
            return
        self._count(partial.nbytes * (self.size - 1))
        mpitype = _mpi_type(partial.dtype)
        row = partial.shape[1]
        self.world.Reduce_scatter([partial, mpitype], [block, mpitype],
                                  recvcounts=[c * row for c in plan.counts], op=MPI.SUM)

    # ---- helpers --------------------------------------------------------------

    def _count(self, nbytes: int) -> None:
        if self.is_driver:
            self.bytes_moved += int(nbytes)

    def _count_blocks(self, full: np.ndarray | None, plan: Plan) -> None:
        if full is not None:
            other = full.shape[1 - plan.axis]
            self._count((sum(plan.counts) - plan.counts[0]) * other * full.itemsize)

    @staticmethod
    def _contiguous_blocks(block_shape: tuple[int, ...], plan: Plan) -> bool:
        """Row blocks, or column blocks of a single row, are contiguous in C order."""
        return plan.axis == 0 or block_shape[0] == 1

    def _vector_spec(self, full: np.ndarray | None, plan: Plan, mpitype: MPI.Datatype,
                     counts: tuple[int, ...] | None = None) -> list | None:
        """Scatterv/Gatherv counts and displacements on the driver (None on workers).

        ``counts`` overrides what is sent (0 for skipped ranks); places stay the plan's.
        """
        if not self.is_driver:
            return None
        unit = 1 if plan.axis == 1 else full.shape[1]  # elements per counted row or column
        counts = plan.counts if counts is None else counts
        return [full, [c * unit for c in counts], [d * unit for d in plan.displs], mpitype]

    def _subarray_transfers(self, full: np.ndarray, plan: Plan, mpitype: MPI.Datatype,
                            post: Any, counts: tuple[int, ...] | None = None) -> None:
        """Driver: one Isend/Irecv per rank, each with a subarray type placing the block in ``full``."""
        requests, types = [], []
        counts = plan.counts if counts is None else counts
        for rank in range(1, self.size):
            if counts[rank]:
                types.append(self._subarray(full.shape, plan, rank, mpitype))
                requests.append(post([full, 1, types[-1]], rank, _TAG_BLOCKS))
        MPI.Request.Waitall(requests)
        for sub in types:
            sub.Free()

    @staticmethod
    def _subarray(shape: tuple[int, int], plan: Plan, rank: int,
                  mpitype: MPI.Datatype) -> MPI.Datatype:
        sub = [shape[0], shape[1]]
        start = [0, 0]
        sub[plan.axis] = plan.counts[rank]
        start[plan.axis] = plan.displs[rank]
        return mpitype.Create_subarray(list(shape), sub, start, order=MPI.ORDER_C).Commit()

    # ---- same-host shared-memory window ----------------------------------------
    #
    # One MPI shared window on the local communicator; only the driver's segment
    # has memory and every rank maps it (Shared_query(0)). Each shared call is
    # collective and brackets its writes with two fences (Win.Sync, local
    # Barrier, Win.Sync: the MPI-3 way to order plain loads and stores between
    # processes), one at entry and one after the writes:
    #   entry fence: no rank writes until every rank has entered this call, so
    #     whatever a rank still reads from the previous call (a bcast_shared view
    #     on a worker, the driver copying out a gather_shared) is finished first;
    #   middle fence: readers start only after every writer is done.
    # With the entry fence, an exit fence after the driver's read is not needed:
    # the next write to the window happens only after the next entry fence, which
    # the driver reaches only once its read has returned.

    _SHARED_MIN_BYTES = 1 << 20
    _win: MPI.Win | None = None
    _shared_mem: np.ndarray | None = None

    @property
    def shared_ready(self) -> bool:
        """True when every rank of the world is on this host (and there is more than one)."""
        return self.size > 1 and self.local_size == self.size

    def _shared_view(self, nbytes: int) -> np.ndarray:
        """Collective over ``self.local`` (same ``nbytes`` everywhere): the driver's window
        segment as a uint8 array of at least ``nbytes``, reallocated (power of two, >= 1 MiB)
        when too small. Reallocating invalidates every earlier view."""
        if self._shared_mem is None or self._shared_mem.nbytes < nbytes:
            self.free_shared()
            size = max(self._SHARED_MIN_BYTES, 1 << max(int(nbytes) - 1, 0).bit_length())
            win = MPI.Win.Allocate_shared(size if self.local_rank == 0 else 0, 1, comm=self.local)
            win.Lock_all(MPI.MODE_NOCHECK)  # passive epoch for Win.Sync, held until free_shared
            buf, _ = win.Shared_query(0)
            self._win, self._shared_mem = win, np.frombuffer(buf, dtype=np.uint8)
        return self._shared_mem

    def _shared_fence(self) -> None:
        self._win.Sync()
        self.local.Barrier()
        self._win.Sync()

    def _check_shared(self, what: str) -> None:
        if not self.shared_ready:
            raise RuntimeError(f"{what}: needs every rank on one host ({self.local_size} of "
                               f"{self.size} here)")

    def bcast_shared(self, array: np.ndarray | None, shape: tuple[int, ...] | None = None,
                     dtype: Any = None) -> np.ndarray:
        """Collective: the driver's ``array`` as a read-only view on every rank, zero copy for
        workers. Workers pass a same-shaped template ``array`` (contents unused) or ``shape``
        and ``dtype``. The view (the driver's too) aliases the window: it is valid only until
        this rank's next shared call (bcast_shared, gather_shared, free_shared)."""
        if self.size == 1:
            out = array.view()
            out.flags.writeable = False
            return out
        self._check_shared("bcast_shared")
        shape = tuple(array.shape) if shape is None else tuple(shape)
        dtype = np.dtype(array.dtype if dtype is None else dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out = self._shared_view(nbytes)[:nbytes].view(dtype).reshape(shape)
        self._shared_fence()
        if self.is_driver:
            self._count(nbytes * (self.size - 1))  # what Bcast would move
            out[...] = array
        self._shared_fence()
        out = out.view()
        out.flags.writeable = False
        return out

    def gather_shared(self, block: np.ndarray, full: np.ndarray | None, plan: Plan) -> None:
        """Like :meth:`gather_blocks` through the window: each rank writes its 2-D ``block``
        at its place in the full matrix (a contiguous range for row blocks, a strided column
        range otherwise), then the driver copies the window into ``full``."""
        if self.size == 1:
            full[...] = block
            return
        self._check_shared("gather_shared")
        shape = list(block.shape)
        shape[plan.axis] = sum(plan.counts)
        nbytes = shape[0] * shape[1] * block.itemsize
        window = self._shared_view(nbytes)[:nbytes].view(block.dtype).reshape(shape)
        self._shared_fence()
        place = plan.block(self.rank)
        window[place if plan.axis == 0 else (slice(None), place)] = block
        self._shared_fence()
        if self.is_driver:
            self._count_blocks(full, plan)
            full[...] = window

    def free_shared(self) -> None:
        """Collective over ``self.local``: release the window (every view of it becomes invalid)."""
        if self._win is not None:
            win, self._win, self._shared_mem = self._win, None, None
            win.Unlock_all()
            win.Free()


class GroupComm(Comm):
    """Some of the ranks (see :meth:`Comm.group`): the same operations over a sub-communicator,
    counting the bytes they move into the whole job's totals."""

    def __init__(self, parent: Comm, sub: MPI.Intracomm) -> None:  # noqa: D107 - no super(): no Dup, no Split
        self.parent, self.world = parent, sub
        self.rank, self.size = sub.Get_rank(), sub.Get_size()
        self.world_rank, self.host = parent.world_rank, parent.host
        self.local, self.local_rank, self.local_size = parent.local, parent.local_rank, parent.local_size
        self.local_peers = parent.local_peers
        self._header = parent._header

    bytes_moved = property(lambda self: self.parent.bytes_moved,
                           lambda self, n: setattr(self.parent, "bytes_moved", n))
    bytes_sent = property(lambda self: self.parent.bytes_sent,
                          lambda self, n: setattr(self.parent, "bytes_sent", n))
    commands = property(lambda self: self.parent.commands)

    def free(self) -> None:
        """Collective over the members: release the sub-communicator."""
        self.world.Free()

    def _whole_job_only(self, *_: Any, **__: Any) -> Any:
        raise CMatrixError("internal: commands, shared memory and grid transfers use the whole job's "
                           "communicator, not a group's")

    send_encoded = recv_header = bcast_shared = gather_shared = free_shared = _whole_job_only
    shared_ready = property(_whole_job_only)
