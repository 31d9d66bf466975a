"""What the MPI test jobs share: a tally of checks and failures, comparing a result with
its reference, refusals that must move nothing, and the summary line the tests read.

    from tally import Tally
    t = Tally("node-ops", cl)
    t.close("softmax", cl.softmax(x), want, rtol=2e-5)
    t.refused("bad axis", "axis", lambda: cl.softmax(x, axis=2))
    t.finish()          # "node-ops: K checks, F failures on N ranks"; exit status 1 on a failure

(``cmatrix run`` puts the job's folder first on ``sys.path``, so jobs import this as a
script next to them would.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import cmatrix as cm


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def as_f64(x: Any) -> np.ndarray:
    """A numpy array or torch tensor (any float type) as float64 numpy."""
    if is_torch(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


class Tally:
    """Checks run and failures seen by one job."""

    def __init__(self, label: str, cl: Any = None) -> None:
        self.label, self.cl = label, cl
        self.checks = 0
        self.failures: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """One check of a condition; a failure is recorded with ``detail``."""
        self.checks += 1
        if not ok:
            self.failures.append(f"{name}: {detail}" if detail else name)
        return bool(ok)

    def close(self, name: str, got: Any, want: Any, rtol: float, scale: Any = None,
              kind: str | None = None, dtype: str | None = None) -> bool:
        """``got`` equals ``want`` within ``rtol * scale`` element-wise, NaN never passing.

        ``scale``: a number or an array of ``want``'s shape (e.g. ``|a| @ |b|`` for a
        product); default ``max(|want|, 1)``. ``kind``: "numpy" or "torch", what ``got``
        must be. ``dtype``: the element type ``got`` must have (e.g. "bfloat16").
        """
        self.checks += 1
        if kind is not None and is_torch(got) != (kind == "torch"):
            self.failures.append(f"{name}: expected a {kind} result, got {type(got).__name__}")
            return False
        if dtype is not None and str(got.dtype).replace("torch.", "") != dtype:
            self.failures.append(f"{name}: result dtype {got.dtype}, expected {dtype}")
            return False
        got, want = as_f64(got), as_f64(want)
        if got.shape != want.shape:
            self.failures.append(f"{name}: shape {got.shape} != {want.shape}")
            return False
        if scale is None:
            scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
        err = np.abs(got - want)
        bad = ~(err <= rtol * np.asarray(scale, dtype=np.float64) + 1e-30)
        if bad.any():
            worst = np.nanmax(err / (np.asarray(scale, dtype=np.float64) + 1e-30), initial=np.nan)
            self.failures.append(f"{name}: {int(bad.sum())} of {bad.size} off, worst rel {worst:.2e}")
            return False
        return True

    def refused(self, name: str, fragment: str, call: Callable[[], Any],
                error: type[BaseException] = cm.InputError) -> bool:
        """``call()`` raises ``error`` whose message holds ``fragment``, and the cluster sent
        no command and moved no data before refusing."""
        self.checks += 1
        before = self.cl.stats() if self.cl is not None else None
        try:
            call()
        except error as exc:
            if fragment not in str(exc):
                self.failures.append(f"{name}: message lacks {fragment!r}: {exc}")
                return False
        except Exception as exc:  # noqa: BLE001 - reported as a failure
            self.failures.append(f"{name}: raised {type(exc).__name__}: {exc}")
            return False
        else:
            self.failures.append(f"{name}: not refused")
            return False
        if before is not None and self.cl.stats() != before:
            self.failures.append(f"{name}: sent a command or moved data before the refusal: "
                                 f"{before} -> {self.cl.stats()}")
            return False
        return True

    def finish(self, ranks: int | None = None) -> None:
        """Print every failure and the summary line; exit 1 if anything failed."""
        for failure in self.failures:
            print("FAILED", failure)
        if ranks is None:
            ranks = self.cl.size if self.cl is not None else 1
        print(f"{self.label}: {self.checks} checks, {len(self.failures)} failures on {ranks} ranks",
              flush=True)
        sys.exit(1 if self.failures else 0)
