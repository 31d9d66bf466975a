"""The tests' way to slow one MPI rank down: jobs/slowdown.py's CPU cgroup, skipped with the
reason where it cannot be made (not root, no CPU controller)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
import slowdown  # noqa: E402


def CpuQuota(name: str = "cmatrix-test") -> slowdown.CpuQuota:  # noqa: N802 - used as the class
    why = slowdown.available()
    if why:
        pytest.skip(why)
    return slowdown.CpuQuota(name)
