"""Shares for a decoder from measured speed: the ranks' saved speed profiles before it
loads (see :mod:`cmatrix.ops.speed`)."""

from __future__ import annotations

from typing import Any

from ..core import shares as sh
from ..ops import speed


def speed_shares(cluster: Any, kind: str) -> tuple[list[float], list[float]]:
    """(shares proportional to each rank's decode rate on ``kind`` weights, each rank's rate in
    GB/s of its stored weights); the profiles are read (or measured briefly) once per job."""
    d = cluster.driver
    if d.speeds is None:
        d.speeds = speed.profiles(d, seconds=speed.QUICK_SECONDS)
    return sh.proportional([r["decode"][kind] for r in d.speeds]), [r["decode_gbps"][kind] for r in d.speeds]
