"""``cmatrix doctor``: what every rank runs on, and what it could run on.

Works under mpirun (every rank reports) and without it (one rank). For the
chosen backends it prints the rank table (host, local rank, device, memory,
fallback); then every rank tries every backend and says what it would get,
or why it cannot load it.
"""

from __future__ import annotations

import sys
from typing import Any

from .._version import __version__
from ..api import session
from ..engine.ranks import format_bytes
from ..errors import CMatrixError


def _split(value: str | None) -> list[str] | str | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items[0] if len(items) == 1 else items


def _accel(value: str | None) -> list[bool] | bool | None:
    items = _split(value)
    if items is None:
        return None
    parse = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    try:
        return parse[items.lower()] if isinstance(items, str) else [parse[i.lower()] for i in items]
    except KeyError:
        raise CMatrixError(f"--accel: expected true/false values, got {value!r}") from None


def _line(name: str, report: dict[str, Any]) -> str:
    if not report["ok"]:
        return f"  {name:<7} unavailable  {report['error']}"
    state = "fallback" if report.get("fallback") else "ok"
    text = f"  {name:<7} {state:<12} {report['device']}, {format_bytes(report.get('memory'))}"
    return text + (f"; {report['fallback']}" if report.get("fallback") else "")


def main(backends: str | None = None, accel: str | None = None) -> int:
    with session.driving() as cl:
        try:
            cl.configure(backends_=_split(backends), accel=_accel(accel))
        except CMatrixError as exc:
            print(f"cmatrix doctor: the chosen backends do not start:\n{exc}\n", file=sys.stderr)
            cl.exit_status = 1
        else:
            hosts = len({r.host for r in cl.ranks})
            mpi = " ".join(cl.ranks[0].versions.get("mpi", "?").split())
            print(f"cmatrix {__version__}: {cl.size} rank(s) on {hosts} host(s); {mpi}\n")
            print(cl.ranks)
        print("\nWhat each backend would give each rank (the device index it would take, given the "
              "other ranks' choices):")
        for report in cl.probe():
            print(f"rank {report['rank']} ({report['host']}):")
            for name, facts in report["backends"].items():
                print(_line(name, facts))
        sys.stdout.flush()
        return cl.exit_status
