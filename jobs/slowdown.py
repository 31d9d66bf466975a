"""Making one MPI rank really slow (for tests and jobs/bench_balance.py), two ways; neither is
a sleep in cmatrix's code.

:class:`CpuQuota`: a CPU cgroup with a quota (cgroup v1 ``cpu.cfs_quota_us``, or v2
``cpu.max``), entered by the rank's own process before it becomes the rank, so only that
rank is held back: the kernel stops it once it has used its share of each 100 ms period
(a laptop that throttles in bursts). Needs root.

:class:`Competitors`: busy processes pinned to the core the rank is pinned to (``pinned``),
so the kernel's fair share gives the rank 1/(k+1) of that core, a few milliseconds at a
time (another program taking the machine).

    with CpuQuota() as slow:
        slow.limit(0.25)                       # a quarter of one core
        cmd = launch.command(1, job) + [":", "-n", "1", *slow.enter(job)]
        ...
        slow.limit(None)                       # no limit (a job may change it while it runs)

The group is removed afterwards (once the processes in it have ended).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def _v1() -> Path | None:
    base = ROOT / "cpu"
    return base if (base / "cpu.cfs_quota_us").exists() else None


def _v2() -> Path | None:
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return ROOT
    return None


def available() -> str | None:
    """Why a CPU quota cannot be set here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to create a CPU cgroup"
    if _v1() is None and _v2() is None:
        return "no cgroup CPU controller (v1 cpu or v2 cpu.max) is mounted"
    return None


class CpuQuota:
    """A CPU cgroup of its own; :meth:`enter` wraps a command so it runs inside."""

    def __init__(self, name: str = "cmatrix-test") -> None:
        why = available()
        if why:
            raise RuntimeError(why)
        base = _v1() or _v2()
        self.v1 = base == _v1()
        if not self.v1:
            subtree = ROOT / "cgroup.subtree_control"
            if "cpu" not in subtree.read_text().split():
                subtree.write_text("+cpu")
        self.path = base / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        self.path.mkdir()

    def limit(self, fraction: float | None) -> None:
        """Hold the group to ``fraction`` of one core (None: no limit)."""
        self.write_limit(self.path, fraction, self.v1)

    @staticmethod
    def write_limit(path: Path, fraction: float | None, v1: bool) -> None:
        quota = -1 if fraction is None else max(1000, int(fraction * PERIOD_US))
        if v1:
            (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (path / "cpu.max").write_text(f"{'max' if quota < 0 else quota} {PERIOD_US}")

    @property
    def limit_file(self) -> Path:
        """The file a job may write to change the limit while it runs (see :meth:`write_limit`)."""
        return self.path / ("cpu.cfs_quota_us" if self.v1 else "cpu.max")

    def enter(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into the group."""
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(self.path / "cgroup.procs"),
                *argv]

    def __enter__(self) -> CpuQuota:
        return self

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):  # the job's processes may take a moment to be reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(self.path, ignore_errors=True)


def pinned(core: int, argv: list[str]) -> list[str]:
    """``argv`` run on CPU core ``core`` only."""
    return [sys.executable, "-c", "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); "
            "os.execvp(sys.argv[2], sys.argv[2:])", str(core), *argv]


class Competitors:
    """``count`` busy processes pinned to ``core``, from :meth:`start` to :meth:`stop`."""

    def __init__(self, core: int, count: int) -> None:
        self.core, self.count = core, count
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        if not self.procs:
            self.procs = [subprocess.Popen(pinned(self.core, [sys.executable, "-c", "while True: pass"]))
                          for _ in range(self.count)]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []

    def __enter__(self) -> Competitors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
