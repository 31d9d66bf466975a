"""Shared test helpers: launching real mpiexec jobs with a hard timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cmatrix.engine import launch

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"


class JobResult:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:
        return f"<JobResult rc={self.returncode}>\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_cmd(cmd: list[str], env: dict | None = None, timeout: float = 120) -> JobResult:
    """Run ``cmd`` in its own process group; on timeout kill the group and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s (a hang): {' '.join(cmd)}\n{out}\n{err}")
    return JobResult(proc.returncode, out, err)


def job_env(extra: dict | None = None) -> dict:
    env = launch.environment(threads=1)
    env.pop("CMATRIX_FAULT", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def mpirun(n: int, job: str | Path, *args: str, env: dict | None = None, timeout: float = 120,
           hostfile: str | None = None, plain: bool = False) -> JobResult:
    """Start ``n`` ranks of ``job`` with the environment's mpiexec.

    By default rank 0 runs the job under ``python -m cmatrix run``; with
    ``plain=True`` every rank runs the script itself (it calls ``cm.init()``).
    """
    runner = [sys.executable, str(job)] if plain else [sys.executable, "-m", "cmatrix", "run", str(job)]
    cmd = launch.command(n, [*runner, *args], hostfile)
    return run_cmd(cmd, job_env(env), timeout)


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
