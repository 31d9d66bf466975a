"""Progress bars for long transfers, on the driver only.

A bar appears when the work is at least ``CMATRIX_PROGRESS_MB`` (default 256)
megabytes and stderr is a terminal, or is a pipe to one: ``cmatrix launch`` sets
``CMATRIX_TTY=1`` when its own stderr is a terminal, since under mpiexec rank 0's
stderr is a pipe. ``CMATRIX_PROGRESS=1`` forces bars on (for logs), ``0`` off.
Without tqdm installed there are no bars.

There is only ever one bar: work that shows its own (loading a model) hides the bars of
the transfers it is made of.
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: the bar shown now, if any: the outermost wins
_shown: list[Any] = []


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
        return total_bytes >= threshold and (sys.stderr.isatty() or os.environ.get("CMATRIX_TTY") == "1")
    except (AttributeError, ValueError):  # stderr replaced or closed
        return False


class _Bar:
    """A tqdm bar that is the one shown while it lasts."""

    def __init__(self, tqdm_bar: Any) -> None:
        self.tqdm = tqdm_bar

    def update(self, n: int) -> None:
        self.tqdm.update(n)

    def __enter__(self) -> _Bar:
        _shown.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _shown.remove(self)
        self.tqdm.close()


def bar(total_bytes: int, desc: str) -> Any:
    """A context manager with ``update(nbytes)``: a tqdm bar (bytes, rate and time left), or
    :class:`NoBar` (also while another bar is shown)."""
    if _shown or not wanted(total_bytes):
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoBar()
    return _Bar(tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                     leave=False, file=sys.stderr, mininterval=0.2))
