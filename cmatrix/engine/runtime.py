"""Per-rank state and the protocol that keeps every rank in step.

Every command runs the same rank half on every rank (see :mod:`.protocol`). Work
that can fail runs inside ``rt.step(...)``; ``rt.sync()`` follows each such step
before the next collective, so a failure on any rank
makes every rank leave the command at the same point: the driver raises
:class:`RankError` naming the ranks, workers go back to waiting. No rank is
left inside a collective its peers abandoned.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..core.dtypes import from_float32, to_float32
from ..errors import CMatrixError, RankError, RankFailure
from . import faults, progress
from .protocol import RANK_HALVES, Header, decode


class Abandoned(Exception):  # noqa: N818 - control flow, never seen by users
    """Worker side: some rank failed, every rank dropped the command."""


class Runtime:
    """One rank's communicator, backend and resident blocks."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.backend: Any = None
        self.backend_name = "none"
        self.blocks: dict[int, Any] = {}
        #: handles sharing one block (a cache reused in memory): id(block) -> count
        self._shared: dict[int, int] = {}
        #: cached matrices resident here: name -> (block, header of its cache file)
        self.named: dict[str, tuple[Any, dict]] = {}
        #: decoders loaded by cmatrix.llm: model id -> this rank's part (see cmatrix.llm.commands)
        self.models: dict[int, Any] = {}
        #: set by a command this rank had no part in: wait for the next one without spinning
        #: (it may well be another such command; the rank's core is better left to others)
        self.bystander = False
        #: what the previous command left for this one (see :meth:`hand_on`)
        self.handed: Any = None
        self._handing: Any = None
        self.op = ""
        self._failure: RankFailure | None = None
        self._wire_buffer: tuple | None = None

    @contextmanager
    def step(self, phase: str) -> Iterator[None]:
        """Run a step that may fail; the failure is reported at the next sync."""
        try:
            yield
            faults.check(self.op, phase, self.comm.world_rank)
        except Exception as exc:
            if self._failure is None:
                self._failure = RankFailure(
                    rank=self.comm.world_rank, host=self.comm.host, backend=self.backend_name,
                    op=self.op, phase=phase, error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                )

    @contextmanager
    def within(self, comm: Any) -> Iterator[None]:
        """Run the collectives of a block (sync, sum_flagged, failures) on ``comm``, some of the
        ranks (see :meth:`cmatrix.engine.comm.Comm.group`), instead of every rank."""
        outer, self.comm = self.comm, comm
        try:
            yield
        finally:
            self.comm = outer

    def sync(self) -> None:
        """Collective: continue only if every rank's steps so far succeeded."""
        if not self.comm.any_failed(self._failure is not None):
            return
        self._fail()

    def sum_flagged(self, buffer: np.ndarray, wire: str = "float32") -> None:
        """Collective: sum the float32 ``buffer`` in place across ranks. Its last element is
        set here to this rank's failure flag, so the same collective does what :meth:`sync`
        does: if any rank failed, every rank leaves (the driver raises).

        ``wire`` "float16" or "bfloat16": each rank's values travel in that type (half the
        bytes of an Allreduce of float32) and every rank adds them up in float32, in rank
        order, so all ranks hold the same sum. A value float16 cannot hold (|x| > 65504)
        sends the whole sum again in float32 rather than lose it.
        """
        buffer[-1] = 0 if self._failure is None else 1
        if wire == "float32" or self.comm.size == 1:
            self.comm.allreduce(buffer, "sum")
            if buffer[-1] != 0:
                self._fail()
            return
        small = from_float32(buffer, wire)
        if small[-1] == 0 and wire == "float16" and not np.isfinite(small[:-1]).all() \
                and np.isfinite(buffer[:-1]).all():
            small[-1] = 2  # out of float16's range: the sum goes again in float32 (a failure wins)
        everyone = self._gathered(small)
        self.comm.allgather(small, everyone)
        flags = to_float32(everyone[:, -1], wire)
        if (flags == 1).any():
            self._fail()
        if (flags == 2).any():
            buffer[-1] = 0
            self.comm.allreduce(buffer, "sum")
            return
        np.sum(to_float32(everyone, wire), axis=0, out=buffer)

    @property
    def failed(self) -> bool:
        """Whether a step of this command failed on this rank (not yet reported)."""
        return self._failure is not None

    def settle(self, failed: list[int]) -> None:
        """Instead of :meth:`sync`, where the failure flags travelled with the command's data
        (a pipeline step: each stage passes them on, and the gather tells the driver which
        ranks failed): each failed rank sends its report to the driver point to point and
        leaves the command; the driver receives the reports of ``failed`` (ranks of this
        communicator) and raises. Ranks that did not fail return: no collective at all."""
        if not self.comm.is_driver:
            if self._failure is not None:
                self.comm.send_object(self._failure, 0)
                self._failure = None
                raise Abandoned
            return
        reports = [self._failure] if self._failure is not None else []
        reports += [self.comm.recv_object(r) for r in failed if r != 0]
        self._failure = None
        if reports:
            raise RankError(reports)

    def _gathered(self, small: np.ndarray) -> np.ndarray:
        """A reused (ranks, size) receive buffer for :meth:`sum_flagged`'s 16-bit sums."""
        key = (self.comm.size, small.size, small.dtype)  # steps may run on groups of other sizes
        if self._wire_buffer is None or self._wire_buffer[0] != key:
            self._wire_buffer = (key, np.empty((self.comm.size, small.size), dtype=small.dtype))
        return self._wire_buffer[1]

    def _fail(self) -> None:
        reports = self.comm.gather_objects(self._failure)
        self._failure = None
        if self.comm.is_driver:
            raise RankError([r for r in reports if r is not None])
        raise Abandoned

    def block(self, ident: int) -> Any:
        try:
            return self.blocks[ident]
        except KeyError:
            raise CMatrixError(f"matrix #{ident} is not resident on this rank") from None

    def store(self, ident: int, x: Any) -> None:
        self.blocks[ident] = x

    def progress(self, total_bytes: int, desc: str) -> Any:
        """A progress bar on the driver (see :mod:`.progress`); a silent stand-in elsewhere."""
        if not self.comm.is_driver:
            return progress.NoBar()
        return progress.bar(total_bytes, desc)

    def alias(self, ident: int, x: Any) -> None:
        """Let handle ``ident`` share the resident block ``x``; freed when its last handle is."""
        self._shared[id(x)] = self._shared.get(id(x), 1) + 1
        self.blocks[ident] = x

    def free(self, ident: int) -> None:
        model = self.models.pop(ident, None)  # a decoder's id (cmatrix.llm) is freed like a block's
        if model is not None:  # collective over its members: every rank frees the same ids in turn
            model.leave_group()
        x = self.blocks.pop(ident, None)
        if x is not None and self._shared.get(id(x), 1) > 1:
            self._shared[id(x)] -= 1
            return
        self._shared.pop(id(x), None)
        for name in [n for n, (b, _) in self.named.items() if b is x]:
            del self.named[name]
        if x is not None and self.backend is not None:
            try:
                self.backend.free(x)
            except Exception as exc:  # freeing is best effort; never stalls the cluster
                print(f"cmatrix rank {self.comm.rank}: free #{ident} failed: {exc}", file=sys.stderr)

    def hand_on(self, value: Any) -> None:
        """Leave ``value`` for the next command only (as :attr:`handed`); dropped after it."""
        self._handing = value

    def execute(self, header: Header, payload: Any = None, frees: Sequence[int] = ()) -> Any:
        """Run ``header``'s rank half here, freeing ``frees`` before it (or after, where the
        header says so: a block it reuses may be among them)."""
        self.op = header.op
        self.handed, self._handing = self._handing, None
        if not header.frees_first:
            try:
                return RANK_HALVES[self.op](self, header, payload)
            finally:
                for ident in frees:
                    self.free(ident)
        for ident in frees:
            self.free(ident)
        return RANK_HALVES[self.op](self, header, payload)


def serve(rt: Runtime) -> int:
    """Worker loop: run the driver's commands until it shuts down; return its status.

    Ctrl-C reaches every rank of a job; a worker leaves it to the driver, which stops
    between commands and shuts the workers down."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        message = rt.comm.recv_header(spin=not rt.bystander)
        rt.bystander = False
        if message["op"] == "shutdown":
            return int(message.get("status", 0))
        try:
            header, frees = decode(message)
            rt.execute(header, None, frees)
        except Abandoned:
            continue
        except BaseException:
            # Outside a step: this rank can no longer follow the protocol.
            print(f"cmatrix rank {rt.comm.rank} ({rt.comm.host}): fatal error in "
                  f"{rt.op!r}, aborting the job", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            rt.comm.abort(1)


def default_threads(local_size: int) -> int:
    """BLAS/backend threads per rank: CMATRIX_THREADS, else a fair share of the host.

    A rank the launcher bound to a subset of cores uses those; an unbound rank
    gets its share of all cores among the ranks on its host.
    """
    env = os.environ.get("CMATRIX_THREADS")
    if env:
        return max(1, int(env))
    total = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if allowed < total:
        return max(1, allowed)
    return max(1, total // max(1, local_size))
