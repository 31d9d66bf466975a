"""Setting the cluster up: ``configure`` (each rank starts its backend), ``probe`` (each
rank tries every backend, for ``cmatrix doctor``) and ``identify`` (each rank's host
names and addresses, for the seed's IP lists). Both halves of each are here.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backends
from .._version import __version__
from ..backends.device import Device
from ..core import shares as sh
from ..core.checks import per_rank
from ..core.plan import equal_weights, validate_weights
from ..engine import launch
from ..engine.driver import Config, Driver
from ..engine.hostaddr import local_identity
from ..engine.protocol import Header, on_ranks
from ..engine.ranks import RankInfo, RankTable
from ..engine.runtime import Runtime, default_threads
from ..errors import CMatrixError, InputError
from . import speed


@dataclass(frozen=True)
class Configure(Header, op="configure"):
    version: str
    backends: tuple[str, ...]
    threads: int | None
    accel: tuple[bool, ...]


@dataclass(frozen=True)
class Probe(Header, op="probe"):
    threads: int | None
    #: the configured backends and accel flags, or None before any configure
    backends: tuple[str, ...] | None
    accel: tuple[bool, ...] | None


@dataclass(frozen=True)
class Identify(Header, op="identify"):
    pass


class SetupMethods:
    """``Cluster.configure`` and ``probe``; the one hook used is ``driver``."""

    driver: Driver

    def configure(self, weights: Sequence[float] | str | None = None,
                  backends_: str | Sequence[str] | None = None,
                  threads: int | None = None, accel: bool | Sequence[bool] | None = None) -> None:
        """Start every rank's backend (once per job) and set the cluster's shares (``"auto"``:
        from each rank's measured speed, see :mod:`cmatrix.ops.speed`)."""
        configure(self.driver, weights, backends_, threads, accel)

    def probe(self) -> list[dict]:
        """Every rank tries every backend: device, memory and fallback, or why it cannot load."""
        c = self.driver.config
        return self.driver.run(Probe(c.threads if c else None, c.backends if c else None,
                                     c.accel if c else None))


def configure(d: Driver, weights: Sequence[float] | str | None = None,
              backends_: str | Sequence[str] | None = None, threads: int | None = None,
              accel: bool | Sequence[bool] | None = None) -> None:
    """The driver's half of :meth:`SetupMethods.configure`: every argument checked first."""
    names = tuple(backends.canonical(n) for n in
                  per_rank(d.size, backends_ if backends_ is not None else "numpy", "backends"))
    flags = per_rank(d.size, True if accel is None else accel, "accel")
    for flag in flags:
        if not isinstance(flag, (bool, np.bool_)):
            raise InputError(f"accel: True or False (one for all ranks, or one per rank), got {flag!r}; "
                             "a string such as 'false' is not read as a flag")
    accel_list = tuple(bool(a) for a in flags)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads: expected a positive integer, got {threads!r}")
    auto = isinstance(weights, str)
    if auto and weights != "auto":
        raise InputError(f"weights: a list of per-rank shares or 'auto' (from each rank's measured "
                         f"speed), got {weights!r}")
    shares = equal_weights(d.size) if weights is None or auto else validate_weights(weights, d.size)
    config = Config(names, threads, accel_list)
    if d.config is not None and config != d.config:
        raise InputError(f"init(): the cluster already runs with backends={list(d.config.backends)}, "
                         f"threads={d.config.threads}, accel={list(d.config.accel)}; start a new job to "
                         "change them")
    if d.config is None:
        infos = d.run(Configure(__version__, names, threads, accel_list))
        check_versions(infos)
        d.config = config
        d.ranks = RankTable([
            RankInfo(rank=i["rank"], host=i["host"], local_rank=i["local_rank"],
                     local_size=i["local_size"], backend=i["backend"], device=i["device"], weight=0.0,
                     threads=i["threads"], fallback=i.get("fallback"), memory=i.get("memory"),
                     dtypes=tuple(i.get("dtypes", ())), versions=i["versions"])
            for i in infos])
    speeds = None
    if auto:  # prefill/matmul-shaped work: the products a job of cl.matmul calls runs
        measured = speed.profiles(d, seconds=speed.QUICK_SECONDS)
        shares = np.asarray(sh.suggested(measured, "gemm", "float32"))
        speeds = [f"{r['gemm']['float32'] / 1e9:.1f} GFLOP/s" for r in measured]
    d.weights, d.auto_weights = shares, auto
    d.ranks = d.ranks.with_weights(shares, speeds)


def check_versions(infos: list[dict]) -> None:
    """Every rank must run the same numpy and MPI library (their buffers must agree)."""
    for key in ("numpy", "mpi"):
        seen = {i["versions"][key] for i in infos}
        if len(seen) > 1:
            detail = ", ".join(f"rank {i['rank']}: {i['versions'][key]}" for i in infos)
            raise InputError(f"ranks run different {key} versions ({detail}); "
                             "install the same environment on every host")


def identify(d: Driver) -> list[dict]:
    """Every rank's ``{"rank", "host", "addresses"}``; needs no configured backend."""
    return d.run(Identify())


# ---- rank halves -------------------------------------------------------------------------

@on_ranks(Configure)
def _configure(rt: Runtime, h: Configure, _: Any) -> list[dict] | None:
    comm = rt.comm
    with rt.step("setup"):
        name = h.backends[comm.rank]
        rt.backend_name = name
        if h.version != __version__:
            raise CMatrixError(f"cmatrix version differs: driver has {h.version}, "
                               f"this rank has {__version__}")
        threads = h.threads or default_threads(comm.local_size)
        accel = h.accel[comm.rank]
        backend = backends.create(name, device_index=_device_index(comm, h.backends, h.accel) if accel else 0,
                                  threads=threads, accel=accel)
        rt.models.clear()
        for ident in list(rt.blocks):
            rt.free(ident)
        rt.backend = Device(backend)
        launch.write_rank_card(comm.rank, comm.host, name)
        info = {
            "rank": comm.rank, "host": comm.host, "local_rank": comm.local_rank,
            "local_size": comm.local_size, "backend": name, "threads": threads,
            "versions": {"cmatrix": __version__, "numpy": np.__version__,
                         "python": platform.python_version(), "mpi": comm.library_version()},
            **rt.backend.describe(),
        }
    rt.sync()
    return comm.gather_objects(info)


def _device_index(comm: Any, names: Sequence[str], accel: Sequence[bool], name: str | None = None) -> int:
    """Ranks of one host that chose the same backend with accel take its devices 0, 1, ...

    ``name``: the index this rank would get on that backend instead of its own.
    """
    name = name or names[comm.rank]
    before = comm.local_peers[: comm.local_rank]
    return sum(1 for r in before if names[r] == name and accel[r])


@on_ranks(Probe)
def _probe(rt: Runtime, h: Probe, _: Any) -> list[dict] | None:
    """Every rank tries every backend (for ``cmatrix doctor``)."""
    comm = rt.comm
    with rt.step("probe"):
        threads = h.threads or default_threads(comm.local_size)
        if h.backends:  # the index this rank would take on each backend, given the others
            index = {name: _device_index(comm, h.backends, h.accel, name) for name in backends.available()}
        else:  # no configuration: as if every rank of the host chose that backend
            index = dict.fromkeys(backends.available(), comm.local_rank)
        report = {"rank": comm.rank, "host": comm.host, "backends": backends.probe_all(index, threads)}
    rt.sync()
    return comm.gather_objects(report)


@on_ranks(Identify)
def _identify(rt: Runtime, h: Identify, _: Any) -> list[dict] | None:
    """Every rank's host name and addresses (for matching a seed-style node_IP_list).

    Runs before ``configure`` is needed: it touches no backend."""
    with rt.step("identify"):
        me = {"rank": rt.comm.rank, "host": rt.comm.host, "addresses": local_identity(rt.comm.host)}
    rt.sync()
    return rt.comm.gather_objects(me)
