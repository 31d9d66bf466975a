"""``cmatrix launch``'s check of the other hosts, before the job starts.

It runs when the hostfile names a host other than this machine (``--no-check`` skips it).
Through the MPI launcher itself (so through the same ssh, ``HYDRA_LAUNCHER_EXEC`` or
``PRTE_MCA_plm_ssh_agent`` the job will use), one ``mpiexec`` per other host starts one
rank of a fixed probe, :mod:`cmatrix.engine.hostprobe`, as ``sys.executable -c <its text>``:
all hosts at once, each with a time limit (30 s). ssh cannot prompt (no terminal, no askpass).
The probe reports versions, host name, working folder, what the hostfile's names resolve
to there, its interfaces and the one it reaches this machine through.

Every problem is reported at once, one line each, naming the host and the fix; then the job
is not started: host unreachable through the launcher (or no ssh here), interpreter missing
there, a different Python, cmatrix or MPI package version, a hostfile name that does not
resolve there (or here), the working folder missing there.

It also chooses, printing each choice:

* per host with several interfaces, the one that reaches this machine:
  ``UCX_NET_DEVICES`` and ``FI_TCP_IFACE`` (MPICH) or ``OMPI_MCA_btl_tcp_if_include`` (Open
  MPI), unless the hostfile line or this environment sets them; an address found on several
  hosts (a container bridge such as 172.17.0.1) is named in a warning and so excluded;
* MPICH: hydra's proxies connect back to this machine by the first hostfile name that is
  this machine, else its host name; when that is a loopback name or does not resolve to
  this machine on a host, ``-localhost ADDRESS`` (the address the hosts reach it at) instead.

:func:`assess` turns probe results into problems and choices without running anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import hostprobe, launch
from ..engine.hostaddr import is_loopback
from ..engine.hostfile import HostLine

#: seconds one host's probe may take, ssh included
TIMEOUT = 30.0
_SSH_FIX = "set up ssh keys: ssh-copy-id {host}, and check `ssh {host} true` works without a password"
_VENV_FIX = ("create the same virtual environment at the same absolute path on {host} "
             "(cmatrix launch starts sys.executable on every host)")
#: launcher output that means ssh (or the launcher's daemon) never got going
_SSH_SIGNS = ("ssh:", "permission denied", "host key verification failed", "could not resolve hostname",
              "connection refused", "connection timed out", "no route to host", "connection closed",
              "launch proxy failed", "daemon failed to report back")


@dataclass
class Outcome:
    """What starting the probe on one host gave: its report, or the launcher's output."""

    host: str
    facts: dict | None = None
    output: str = ""
    returncode: int | None = None  # None: no answer within the time limit


@dataclass
class Verdict:
    """Problems (each stops the job), warnings and notes (printed), and the choices made:
    settings per host name and options for the launcher."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    options: list[str] = field(default_factory=list)


def connect_back_name(lines: list[HostLine]) -> str:
    """The name MPICH's hydra gives its proxies to reach this machine: the first hostfile
    host that is this machine, else this machine's host name."""
    return next((line.host for line in lines if launch.is_local(line.host)), socket.gethostname())


def check(lines: list[HostLine], env: dict, impl: str | None = None, timeout: float = TIMEOUT) -> Verdict:
    """The whole check: resolve and route here, probe every other host through the launcher
    (all at once), then :func:`assess`."""
    impl = impl or launch.implementation()
    back = connect_back_name(lines)
    names = list(dict.fromkeys([line.host for line in lines] + [back]))
    here = hostprobe.facts(None, names)
    remote = [h for h in dict.fromkeys(line.host for line in lines) if not launch.is_local(h)]
    routes = {h: _route(here["resolved"].get(h)) for h in remote}
    reachable = [h for h in remote if routes[h]]
    outcomes = probe_all(reachable, routes, names, env, impl, timeout)
    return assess(lines, here, routes, outcomes, impl, back, env, timeout)


def _route(addresses: list[str] | None) -> str | None:
    """This machine's address toward a host (its first address, IPv4 first)."""
    return hostprobe.route(addresses[0]) if addresses else None


def probe_command(host: str, driver: str, names: list[str], env: dict, impl: str) -> list[str]:
    """mpiexec argv running the probe as one rank on ``host`` with this interpreter."""
    forward = launch.travelling(env)
    probe = [sys.executable, "-c", Path(hostprobe.__file__).read_text(), "--driver", driver, *names]
    if impl == "openmpi":
        return [launch.mpiexec(), "--bind-to", "none", "-n", "1", "--host", f"{host}:1",
                *[a for name in forward for a in ("-x", name)], *probe]
    # hydra's proxy connects back to this machine's host name (the job's, to its first local
    # hostfile name): the probe uses the address that reaches ``host``, so it tests ssh and
    # the interpreter whatever the names (which it checks on its own)
    back = ["-localhost", driver] if driver else []
    return [launch.mpiexec(), *back, *(["-genvlist", ",".join(forward)] if forward else ["-genvnone"]),
            "-hosts", host, "-n", "1", *probe]


def probe_all(hosts: list[str], routes: dict[str, str | None], names: list[str], env: dict,
              impl: str, timeout: float = TIMEOUT) -> dict[str, Outcome]:
    """The probe on every host at once, each within ``timeout`` seconds."""
    quiet = {k: v for k, v in env.items() if k not in ("DISPLAY", "SSH_ASKPASS")}
    quiet["SSH_ASKPASS_REQUIRE"] = "never"  # and no terminal: ssh fails instead of asking
    outcomes: dict[str, Outcome] = {}

    def one(host: str, k: int) -> None:
        cmd = probe_command(host, routes[host] or "", names, quiet, impl)
        outcomes[host] = _run(host, cmd, _own_port(quiet, k), timeout)

    threads = [threading.Thread(target=one, args=(h, k), daemon=True) for k, h in enumerate(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return {h: outcomes.get(h, Outcome(h)) for h in hosts}


def _own_port(env: dict, k: int) -> dict:
    """``env`` for the k-th of the probes running at once: with a range for MPICH's control port
    (``MPIEXEC_PORT_RANGE``, as ``cmatrix launch --ports`` sets), one port of it of its own:
    mpiexecs started together in one range can pick the same port, and one then fails."""
    lo, _, hi = env.get("MPIEXEC_PORT_RANGE", "").partition(":")
    if not (lo.isdigit() and hi.isdigit()) or int(lo) + k > int(hi):
        return env
    return {**env, "MPIEXEC_PORT_RANGE": f"{int(lo) + k}:{int(lo) + k}"}


def _run(host: str, cmd: list[str], env: dict, timeout: float) -> Outcome:
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Outcome(host, None, out + err, None)
    facts = None
    for line in out.splitlines():
        if line.startswith(hostprobe.MARK):
            with contextlib.suppress(ValueError):
                facts = json.loads(line[len(hostprobe.MARK):])
    return Outcome(host, facts, out + err, proc.returncode)


def failure(host: str, outcome: Outcome, impl: str, timeout: float = TIMEOUT) -> str:
    """One line for a host where the probe did not report: what the launcher said, and the fix."""
    text = outcome.output
    lower = " ".join(text.lower().split())  # Open MPI wraps its sentences
    python = sys.executable
    if outcome.returncode is None:
        return (f"{host}: no answer through the launcher within {timeout:g} s; "
                + _SSH_FIX.format(host=host) + f" (and that {host} is on)")
    if (f"execvp error on file {python}" in text or "could not access an executable" in lower
            or f"{python.lower()}: no such file" in lower):
        return f"{host}: {python} does not exist there; " + _VENV_FIX.format(host=host)
    if ("[mpiexec@" in text and "execvp error on file" in text) or "no available launching agents" in lower:
        where = "HYDRA_LAUNCHER_EXEC" if impl != "openmpi" else "PRTE_MCA_plm_ssh_agent"
        said = _line(text, "execvp", "launching")
        return (f"{host}: the launcher cannot start ssh on this machine ({said}); install an ssh "
                f"client here (e.g. apt-get install openssh-client) or name one in {where}")
    if "wdir" in lower or "working directory" in lower:
        return (f"{host}: the working folder {os.getcwd()} does not exist there "
                f"({_line(text, 'wdir', 'working directory')}); create it on {host} or start "
                "cmatrix launch from a folder every host has (relative paths resolve from it)")
    if any(sign in lower for sign in _SSH_SIGNS):
        said = _line(text, *_SSH_SIGNS)
        return f"{host}: the launcher cannot reach it ({said}); " + _SSH_FIX.format(host=host)
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")
    return (f"{host}: the probe did not report (exit status {outcome.returncode}: {last[:200]}); "
            f"check that `ssh {host} {python} -c pass` works")


def _line(text: str, *signs: str) -> str:
    """The first line of ``text`` with the first of ``signs`` found in it (case-insensitive;
    ssh's own words before the launcher's), shortened."""
    for sign in signs:
        for line in text.splitlines():
            if sign in line.lower():
                return " ".join(line.split())[:200]
    return "no details"


def assess(lines: list[HostLine], here: dict, routes: dict[str, str | None], outcomes: dict[str, Outcome],
           impl: str, back: str, env: dict, timeout: float = TIMEOUT) -> Verdict:
    """Problems, warnings and choices from this machine's facts (``here``), its address
    toward each other host (``routes``; None: the name does not resolve here) and each
    host's probe outcome. ``back``: :func:`connect_back_name`. Runs nothing."""
    v = Verdict()
    me = here.get("hostname") or "this machine"
    probed: dict[str, dict] = {}
    for host, address in routes.items():
        if address is None:
            v.problems.append(f"{host}: the name does not resolve on this machine ({me}); add {host} to "
                              f"/etc/hosts on {me} or use addresses in the hostfile")
            continue
        outcome = outcomes.get(host) or Outcome(host)
        if outcome.facts is None:
            v.problems.append(failure(host, outcome, impl, timeout))
            continue
        probed[host] = outcome.facts
        _versions(v, host, outcome.facts, here)
        resolved = outcome.facts.get("resolved", {})
        for name in dict.fromkeys(line.host for line in lines):
            if name in resolved and resolved[name] is None:
                v.problems.append(f"{host}: the hostfile name {name} does not resolve there; add {name} "
                                  f"to /etc/hosts on {host} or use addresses in the hostfile")
        if outcome.facts.get("cwd") != here.get("cwd"):
            v.warnings.append(f"{host}: ranks there start in {outcome.facts.get('cwd')}, not in "
                              f"{here.get('cwd')}; relative paths in the job's arguments resolve from there")
    if probed and not v.problems:
        mpi = ", ".join(f"{k} {val}" for k, val in sorted(here.get("mpi", {}).items()))
        v.notes.append(f"checked {len(probed)} other host(s) through the launcher: Python "
                       f"{here.get('python')}, cmatrix {here.get('cmatrix')}{', ' + mpi if mpi else ''} "
                       "everywhere")
    _interfaces(v, lines, here, routes, probed, impl, env)
    if impl != "openmpi":
        _connect_back(v, here, routes, probed, back)
    return v


def _versions(v: Verdict, host: str, facts: dict, here: dict) -> None:
    python = here.get("executable") or sys.executable
    mine, theirs = here.get("python", "?"), facts.get("python", "?")
    if mine.split(".")[:2] != theirs.split(".")[:2]:
        v.problems.append(f"{host}: Python {theirs} there, {mine} here; recreate the virtual environment "
                          f"{python} on {host} with Python {'.'.join(mine.split('.')[:2])} and install the "
                          f"same cmatrix version ({here.get('cmatrix')})")
    if facts.get("cmatrix") is None:
        v.problems.append(f"{host}: cmatrix is not installed for {python} there; install the same cmatrix "
                          f"version ({here.get('cmatrix')}) into it")
    elif facts["cmatrix"] != here.get("cmatrix"):
        v.problems.append(f"{host}: cmatrix {facts['cmatrix']} there, {here.get('cmatrix')} here; install "
                          f"the same cmatrix version ({here.get('cmatrix')}) on {host}")
    mpi_here, mpi_there = here.get("mpi", {}), facts.get("mpi", {})
    if mpi_here != mpi_there:
        def show(d: dict) -> str:
            return ", ".join(f"{k} {val}" for k, val in sorted(d.items())) or "none from PyPI"

        pins = " ".join(f"{k}=={val}" for k, val in sorted(mpi_here.items()))
        v.problems.append(f"{host}: MPI packages {show(mpi_there)} there, {show(mpi_here)} here; install "
                          f"the same on {host}" + (f" (pip install {pins})" if pins else ""))


def _interfaces(v: Verdict, lines: list[HostLine], here: dict, routes: dict[str, str | None],
                probed: dict[str, dict], impl: str, env: dict) -> None:
    """Warn about addresses several hosts share; pin each host with several interfaces to
    the one that reaches this machine (this machine: the one that reaches the others)."""
    def key(facts: dict) -> tuple:
        if is_loopback((facts.get("route") or {}).get("from") or "0.0.0.0"):
            return key(here)  # it reaches this machine over loopback: it is this machine
        return facts.get("hostname"), tuple(sorted(facts.get("interfaces", {}).items()))

    machines = {key(here): ("this machine", here.get("interfaces", {}))}
    for host, facts in probed.items():
        machines.setdefault(key(facts), (host, facts.get("interfaces", {})))
    owners: dict[str, list[str]] = {}
    for label, ifaces in machines.values():
        for iface, address in ifaces.items():
            if not is_loopback(address):
                owners.setdefault(address, []).append(f"{iface} on {label}")
    shared = {a for a, who in owners.items() if len(who) > 1}
    for address in sorted(shared):
        v.warnings.append(f"{address} is an address of several hosts ({', '.join(owners[address])}), "
                          "as container bridges are: excluded; ranks use the interface that reaches "
                          "this machine")
    names = ("OMPI_MCA_btl_tcp_if_include",) if impl == "openmpi" else ("UCX_NET_DEVICES", "FI_TCP_IFACE")
    here_key = key(here)
    choices: dict[str, tuple[str, str, dict]] = {}  # host -> (iface, address, its interfaces)
    for host, facts in probed.items():
        route = facts.get("route") or {}
        if key(facts) == here_key:
            continue  # this machine under another name: its ranks use loopback or the choice below
        if route.get("from") in shared:
            v.problems.append(f"{host}: it reaches this machine from {route.get('from')}, an address "
                              "other hosts have too; give each host its own address on the network it "
                              "shares with this machine")
        elif route.get("iface"):
            choices[host] = (route["iface"], route["from"], facts.get("interfaces", {}))
        else:
            v.warnings.append(f"{host}: cannot tell which interface reaches this machine (from "
                              f"{route.get('from')}); set {names[0]}=<interface> on its hostfile line "
                              "if ranks do not connect")
    ours = {iface for a in routes.values() if a and not is_loopback(a)
            for iface, address in here.get("interfaces", {}).items() if address == a}
    if len(ours) == 1 and probed:
        iface = next(iter(ours))
        for line in lines:
            if launch.is_local(line.host):
                choices[line.host] = (iface, here["interfaces"][iface], here.get("interfaces", {}))
    elif len(ours) > 1:
        v.warnings.append("this machine reaches the other hosts through several interfaces "
                          f"({', '.join(sorted(ours))}): its own ranks are not pinned to one")
    for host, (iface, address, ifaces) in choices.items():
        if sum(not is_loopback(a) for a in ifaces.values()) < 2:
            continue
        own = {n for line in lines if line.host == host for n in line.env}
        pinned = {n: iface for n in names if n not in own and n not in env}
        if pinned:
            v.env[host] = pinned
            v.notes.append(f"{host}: ranks use {iface} ({address}), the interface that reaches "
                           + ("the other hosts" if launch.is_local(host) else "this machine")
                           + ": " + " ".join(f"{n}={val}" for n, val in pinned.items()))


def _connect_back(v: Verdict, here: dict, routes: dict[str, str | None], probed: dict[str, dict],
                  back: str) -> None:
    """MPICH: hydra's proxies connect back to ``back``; where it is a loopback name or
    resolves elsewhere on some host, give hydra the address instead (-localhost)."""
    wrong = [h for h, facts in probed.items()
             if is_loopback(back) or routes.get(h) not in (facts.get("resolved", {}).get(back) or [])]
    wrong = [h for h in wrong if not is_loopback(routes.get(h) or "")]
    if not wrong:
        return
    addresses = {routes[h] for h in probed if routes.get(h) and not is_loopback(routes[h] or "")}
    if len(addresses) == 1:
        address = next(iter(addresses))
        v.options += ["-localhost", address]
        v.notes.append(f"the hosts reach this machine at {address}, not by the name {back} "
                       f"({', '.join(wrong)}): mpiexec -localhost {address}")
        return
    for h in wrong:
        v.problems.append(f"{h}: this machine's name {back} does not resolve there to {routes[h]}, the "
                          f"address {h} reaches it at; add '{routes[h]} {back}' to /etc/hosts on {h}")
