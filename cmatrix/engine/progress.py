"""Progress bars for long transfers, on the driver only.

A bar appears when the work is at least ``CMATRIX_PROGRESS_MB`` (default 256)
megabytes and stderr is a terminal; ``CMATRIX_PROGRESS=1`` forces bars on
(for logs), ``0`` off. Without tqdm installed there are no bars.
"""

from __future__ import annotations

import os
import sys
from typing import Any


class NoBar:
    """Stands in for a bar when none is shown."""

    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def wanted(total_bytes: int) -> bool:
    force = os.environ.get("CMATRIX_PROGRESS", "")
    if force in ("0", "1"):
        return force == "1"
    try:
        threshold = float(os.environ.get("CMATRIX_PROGRESS_MB", "256")) * 2**20
    except ValueError:  # a bad setting must never stop a transfer
        threshold = 256 * 2**20
    try:
        return total_bytes >= threshold and sys.stderr.isatty()
    except (AttributeError, ValueError):  # stderr replaced or closed
        return False


def bar(total_bytes: int, desc: str) -> Any:
    """A context manager with ``update(nbytes)``: a tqdm bar, or :class:`NoBar`."""
    if not wanted(total_bytes):
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoBar()
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False, file=sys.stderr, mininterval=0.2)
