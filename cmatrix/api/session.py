"""Process lifecycle: starting MPI on a rank, the one place that decides serve-or-drive,
``init()``, and shutting the workers down when the driver leaves.

Every entry point (``cm.init()``, ``cmatrix run``/``generate``/``doctor``, the seed's
``cluster_matrix``) reaches the cluster through :func:`driver_cluster` (or
:func:`driving`, which also shuts the workers down at the end of its block): on a
worker rank it serves the driver's commands and then ends the process with the
driver's status, so the code after it runs on the driver alone.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .. import ops  # noqa: F401  (registers every command family's rank half)
from ..engine import launch
from ..engine.driver import Driver
from ..engine.runtime import Runtime, serve
from ..errors import ClusterClosedError
from ..llm import commands, moves  # noqa: F401  (the decoder's commands)
from .cluster import Cluster

_runtime: Runtime | None = None
_cluster: Cluster | None = None


def connect() -> Runtime:
    """Start MPI on this rank (once) and return its runtime."""
    global _runtime
    if _runtime is None:
        from ..engine.comm import Comm  # MPI starts here, not when cmatrix is imported

        _runtime = Runtime(Comm())
    return _runtime


def claim_ranks() -> None:
    """Run when cmatrix is imported. Under a launch of N ranks (``mpirun -n N python
    script.py``) a worker rank starts serving here, so it never runs the rest of the script
    (a prologue that writes files would otherwise run on every rank), and the driver starts
    its cluster, so the workers are released however the script ends. Without an MPI
    launcher nothing happens until ``init()``. ``CMATRIX_EVERY_RANK=1`` turns this off, for
    programs that run their own MPI code on every rank."""
    if launch.launcher_rank() is None or os.environ.get("CMATRIX_EVERY_RANK", "") == "1":
        return
    # Only the process the launcher started: a child of it (subprocess, multiprocessing) inherits
    # the launcher's variables but is no rank.
    claimed = os.environ.get("CMATRIX_CLAIMED")
    if (claimed and claimed != str(os.getpid())) or multiprocessing.parent_process() is not None:
        return
    os.environ["CMATRIX_CLAIMED"] = str(os.getpid())
    driver_cluster()


def world_size() -> int:
    """Number of ranks in this job (starts MPI on first use)."""
    return connect().comm.size


def driver_cluster() -> Cluster:
    """Serve or drive. On a worker rank: serve the driver's commands until it shuts down,
    then end this process with the driver's exit status. On the driver (rank 0): the
    job's one :class:`Cluster`, created on first use.

    From creation on, leaving the driver's process (normally or by an uncaught error,
    even one raised by ``init()`` itself) shuts the workers down, so they never wait for
    a driver that is gone.
    """
    global _cluster
    rt = connect()
    if not rt.comm.is_driver:
        sys.exit(serve(rt))
    if _cluster is None:
        _cluster = Cluster(Driver(rt))
        atexit.register(_at_exit)
        _chain_excepthook()
    return _cluster


@contextmanager
def driving() -> Iterator[Cluster]:
    """``with driving() as cl:`` runs its block on the driver alone (workers serve, then
    exit) and shuts the workers down at its end with ``cl.exit_status`` (1 if the block
    raised)."""
    cl = driver_cluster()
    try:
        yield cl
    except SystemExit as exc:
        cl.exit_status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except BaseException:
        cl.exit_status = cl.exit_status or 1
        raise
    finally:
        cl.shutdown(cl.exit_status)


def init(weights: Sequence[float] | str | None = None, backends: str | Sequence[str] | None = None,
         threads: int | None = None, accel: bool | Sequence[bool] | None = None) -> Cluster:
    """Join the cluster. On the driver (rank 0) return the :class:`Cluster`;
    on every other rank serve the driver's commands, then exit the process.

    ``weights``: per-rank shares summing to 1 (default equal), or ``"auto"``: proportional
    to each rank's measured speed (a saved profile, else measured briefly now; see
    ``cmatrix bench``); a model loaded later takes its own from the same profile. ``backends``: a
    backend name for all ranks or one per rank (default "numpy"). ``threads``:
    CPU threads per rank (default: CMATRIX_THREADS, else a fair share of the
    host's cores). ``accel``: False for a backend's plain CPU path.
    """
    cluster = driver_cluster()
    if cluster.closed:
        raise ClusterClosedError("init(): this job's cluster was already shut down")
    cluster.configure(weights, backends, threads, accel)
    return cluster


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
