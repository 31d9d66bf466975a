"""Per-rank state and the protocol that keeps every rank in step.

Every command runs the same handler on every rank (driver and worker halves
side by side). Work that can fail runs inside ``rt.step(...)``; ``rt.sync()``
follows each such step before the next collective, so a failure on any rank
makes every rank leave the command at the same point: the driver raises
:class:`RankError` naming the ranks, workers go back to waiting. No rank is
left inside a collective its peers abandoned.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import faults, progress
from .errors import CMatrixError, RankError, RankFailure

#: command name -> handler(rt, header, payload); payload is driver-only data
COMMANDS: dict[str, Callable[[Runtime, dict, Any], Any]] = {}


def command(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


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
        #: a shard read from disk by cache_check, waiting for the shard command
        self.staged: tuple[str, Any] | None = None
        #: decoders loaded by cmatrix.llm: model id -> this rank's part (see ops_llm)
        self.models: dict[int, Any] = {}
        self.op = ""
        self._failure: RankFailure | None = None

    @contextmanager
    def step(self, phase: str) -> Iterator[None]:
        """Run a step that may fail; the failure is reported at the next sync."""
        try:
            yield
            faults.check(self.op, phase, self.comm.rank)
        except Exception as exc:
            if self._failure is None:
                self._failure = RankFailure(
                    rank=self.comm.rank, host=self.comm.host, backend=self.backend_name,
                    op=self.op, phase=phase, error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                )

    def sync(self) -> None:
        """Collective: continue only if every rank's steps so far succeeded."""
        if not self.comm.any_failed(self._failure is not None):
            return
        self._fail()

    def sum_checked(self, partial: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        """Collective: every rank gets the sum of the float32 ``partial`` arrays; the same
        Allreduce carries each rank's failure flag, so it also does what :meth:`sync` does."""
        buffer = np.zeros(math.prod(shape) + 1, dtype=np.float32)
        if self._failure is None and partial is not None and partial.size == buffer.size - 1:
            buffer[:-1] = partial.ravel()
        else:  # this rank failed (or, a bug, computed the wrong shape): every rank stops here
            buffer[-1] = 1
            if self._failure is None:
                with self.step("sum"):
                    raise CMatrixError(f"partial of {getattr(partial, 'shape', None)}, expected {shape}")
        self.comm.allreduce(buffer, "sum")
        if buffer[-1] != 0:
            self._fail()
        return buffer[:-1].reshape(shape)

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
        self.models.pop(ident, None)  # a decoder's id (cmatrix.llm) is freed like a block's
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

    def execute(self, header: dict, payload: Any = None) -> Any:
        self.op = header["op"]
        if self.op != "shard" or not header.get("cache"):
            self.staged = None  # only the cached shard right after cache_check uses it
        frees = header.get("free", ())
        if self.op == "shard" and header.get("cache"):
            # A handle collected since cache_check may be the one whose block this reuses.
            try:
                return COMMANDS[self.op](self, header, payload)
            finally:
                for ident in frees:
                    self.free(ident)
        for ident in frees:
            self.free(ident)
        return COMMANDS[self.op](self, header, payload)


def serve(rt: Runtime) -> int:
    """Worker loop: run the driver's commands until it shuts down; return its status."""
    while True:
        header = rt.comm.recv_header()
        if header["op"] == "shutdown":
            return int(header.get("status", 0))
        try:
            rt.execute(header)
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
