"""Fault injection, so the failure paths can be tested on a real cluster.

``CMATRIX_FAULT="op:phase:rank[:action]"`` (comma-separated for several)
makes that rank fail at the end of that step, once: ``raise`` (default)
raises an exception, ``exit`` ends the process at once as a crash would.
Unset, this costs one truth test per step.
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    """Raised where CMATRIX_FAULT asked for a failure."""


def _parse(spec: str) -> dict[tuple[str, str, int], str]:
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"CMATRIX_FAULT: expected op:phase:rank[:action], got {item!r}")
        faults[(parts[0], parts[1], int(parts[2]))] = parts[3] if len(parts) == 4 else "raise"
    return faults


_FAULTS = _parse(os.environ.get("CMATRIX_FAULT", ""))


def check(op: str, phase: str, rank: int) -> None:
    action = _FAULTS.pop((op, phase, rank), None) if _FAULTS else None
    if action == "exit":
        os._exit(17)
    if action is not None:
        raise InjectedFault(f"injected fault in {op}/{phase} on rank {rank}")
