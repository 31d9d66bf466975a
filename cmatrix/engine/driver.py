"""The driver's end of the protocol: the one interface op modules use to reach the ranks.

A :class:`Driver` sends each command's header to every worker, runs the command's rank
half on the driver too (rank 0 computes its share), and keeps what the driver must know
between commands: ids, frees that wait for the next command, the ranks' configuration.
``cmatrix.Cluster`` is a facade over one Driver; op modules never touch its insides.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.plan import equal_weights
from ..errors import ClusterClosedError, CMatrixError, InputError, RankError
from .protocol import Header, on_ranks
from .ranks import RankTable
from .runtime import Runtime


@dataclass(frozen=True)
class Config:
    """What every rank runs with, fixed by the first ``configure`` of a job."""

    backends: tuple[str, ...]
    threads: int | None
    accel: tuple[bool, ...]


@dataclass(frozen=True)
class Free(Header, op="free"):
    ids: tuple[int, ...]


@on_ranks(Free)
def _free(rt: Runtime, h: Free, _: Any) -> None:
    for ident in h.ids:
        rt.free(ident)


class Driver:
    """Runs commands on every rank; see the module docstring."""

    def __init__(self, runtime: Runtime) -> None:
        #: the driver's own rank (it holds a share like every worker)
        self.runtime = runtime
        self._comm = runtime.comm
        self._next_id = 1
        self._pending_free: list[int] = []
        self._closed = False
        self._busy = False
        #: the status workers exit with when the driver shuts them down
        self.exit_status = 0
        #: per-rank shares used when an operation is given none
        self.weights = equal_weights(self.size)
        #: whether ``weights`` came from measured speed (``init(weights="auto")``), and the
        #: ranks' speed profiles they came from (see :mod:`cmatrix.ops.speed`)
        self.auto_weights = False
        self.speeds: list[dict] | None = None
        self.ranks = RankTable([])
        #: None until the first configure
        self.config: Config | None = None
        #: live handles of cached matrices, by name (kept by :mod:`cmatrix.ops.cache`)
        self.named: dict[str, weakref.WeakSet] = {}
        self._interrupted = False
        if threading.current_thread() is threading.main_thread() and self.size > 1:
            signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_interrupt(self, signum: int, frame: object) -> None:
        """Ctrl-C: between commands, KeyboardInterrupt as usual; during one, after it (every
        rank must finish its collectives); a second Ctrl-C during one ends the job."""
        if not self._busy:
            raise KeyboardInterrupt
        if self._interrupted:
            print("\ncmatrix: stopped by the user in the middle of an operation", file=sys.stderr, flush=True)
            self._comm.abort(130)
        self._interrupted = True

    @property
    def size(self) -> int:
        """Number of ranks (device slots), driver included."""
        return self._comm.size

    @property
    def closed(self) -> bool:
        return self._closed

    def new_id(self) -> int:
        """A fresh id for a block (or decoder) the next command creates."""
        self._next_id += 1
        return self._next_id

    def check_dtype(self, dtype: str, counts: Sequence[int] | None = None) -> None:
        """Refuse, before data moves, a dtype that a rank holding data cannot compute in."""
        for r in self.ranks:
            if dtype not in r.dtypes and (counts is None or counts[r.rank] > 0):
                raise InputError(f"rank {r.rank} ({r.host}, {r.backend} on {r.device}) cannot compute "
                                 f"in {dtype} (it has {', '.join(r.dtypes)}); convert the data, give "
                                 "that rank a zero share, or choose another backend for it")

    def free(self, ids: Sequence[int]) -> None:
        """Release blocks on every rank now (with the next command when one is running)."""
        if self._closed or not ids:
            return
        if self._busy:  # a finalizer ran in the middle of a command: free with the next one
            self._pending_free.extend(ids)
            return
        self.run(Free(tuple(ids)))

    def free_later(self, ident: int) -> None:
        """Release a block with the next command (safe from ``__del__`` and finalizers)."""
        self._pending_free.append(ident)

    def run(self, header: Header, payload: Any = None) -> Any:
        """Run one command on every rank; returns the rank half's result on the driver.

        A failure on any rank raises :class:`RankError` with every rank back in step; a
        failure of the driver outside a step aborts the job (workers may be inside a
        collective the driver will never join)."""
        if self._closed:
            raise ClusterClosedError("the cluster was shut down")
        if self._busy:
            raise CMatrixError(f"cannot start {header.op!r} while another cluster operation "
                               "is running (from a finalizer or a second thread)")
        message = header.to_wire()
        frees = tuple(self._pending_free)
        if frees:
            message["free"] = frees
        self._busy = True  # from here a Ctrl-C waits for the command (see _on_interrupt)
        self._interrupted = False
        try:
            encoded = self._comm.encode_header(message)  # fails, if at all, before any MPI call
        except BaseException:
            self._busy = False
            raise
        # a finalizer may have queued more frees while the header was pickled: keep those
        del self._pending_free[:len(frees)]
        try:
            self._comm.send_encoded(encoded)
            result = self.runtime.execute(header, payload, frees)
            if self._interrupted:  # Ctrl-C arrived during the command: raise it now, in step
                self._pending_free.extend(header.created())  # the caller gets no handle to free
                self._busy = False
                raise KeyboardInterrupt
            return result
        except RankError as exc:
            # Ranks that got past their store step hold a block no handle will free.
            self._pending_free.extend(header.created())
            if self._interrupted:
                raise KeyboardInterrupt from exc
            raise
        except KeyboardInterrupt:
            if not self._busy or self.size == 1:  # after the command, or nobody else to wait for
                raise
            print(f"\ncmatrix: stopped by the user inside {header.op!r}", file=sys.stderr, flush=True)
            self._comm.abort(130)
        except BaseException:
            print(f"cmatrix: the driver failed inside {header.op!r}; aborting the job", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            self._comm.abort(1)
        finally:
            self._busy = False
            self._interrupted = False

    def stats(self) -> dict[str, int]:
        """Commands sent and bytes of array data moved between ranks so far."""
        return {"commands": self._comm.commands, "bytes_moved": self._comm.bytes_moved}

    def shutdown(self, status: int = 0) -> None:
        """Tell every worker to exit with ``status``; no command can run afterwards."""
        if self._closed:
            return
        if self._busy:
            raise CMatrixError("cannot shut down while a cluster operation is running")
        self._busy = True  # a Ctrl-C here waits: the workers must get their shutdown
        try:
            self._closed = True
            self._comm.send_header({"op": "shutdown", "status": int(status)})
        finally:
            self._busy = False
