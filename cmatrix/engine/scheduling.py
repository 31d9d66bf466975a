"""How long the kernel held this thread back: runnable, but not running (another program on its
core, a CPU quota). A rank held back while the others need it in a collective delays them as
much as slow arithmetic does; this is how that time is told apart from computing
(:mod:`cmatrix.ops.speed`, :mod:`cmatrix.llm.rebalance`)."""

from __future__ import annotations

import os


class RunDelay:
    """Seconds the calling thread has been runnable but not running (preempted, or held back
    by a CPU quota) since it started, from ``/proc/thread-self/schedstat``; always 0 where
    the kernel does not say (not Linux)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> float:
        if self._fd is None:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
