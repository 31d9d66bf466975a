"""Process lifecycle: starting MPI on a rank, ``init()``, and shutting down on exit."""

from __future__ import annotations

import atexit
import sys
from collections.abc import Sequence

from .cluster import Cluster
from .errors import ClusterClosedError
from .runtime import Runtime, serve

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
    rt = connect()
    if not rt.comm.is_driver:
        sys.exit(serve(rt))
    cluster = driver_cluster()
    if cluster.closed:
        raise ClusterClosedError("init(): this job's cluster was already shut down")
    cluster.configure(weights, backends, threads, accel)
    return cluster


def driver_cluster() -> Cluster:
    """The driver's one Cluster, created on first use.

    From creation on, leaving the process (normally or by an uncaught error,
    even one raised by ``init()`` itself) shuts the workers down, so they never
    wait for a driver that is gone.
    """
    global _cluster
    if _cluster is None:
        _cluster = Cluster(connect())
        atexit.register(_at_exit)
        _chain_excepthook()
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
