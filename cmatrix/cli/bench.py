"""``cmatrix bench``: every rank's measured speed and the shares it suggests.

Works under mpirun / ``cmatrix launch`` (every rank measures, all at once) and alone
(one rank). Prints per rank the decode-shaped rate (GB/s of weights as the rank stores
them) and the prefill-shaped one (GFLOP/s) for float32, 16-bit, q8_0 and q4_0 weights,
its free memory, and the shares each kind of work would get. Profiles are saved on each
host (see :mod:`cmatrix.ops.speed`) and reused by ``--weights auto``.
"""

from __future__ import annotations

import sys

from ..api import session
from ..core import shares as sh
from ..engine.ranks import format_bytes
from ..errors import CMatrixError
from ..ops import speed
from .doctor import _accel, _split

_LABEL = {"float32": "f32", "16bit": "16-bit", "q8_0": "q8_0", "q4_0": "q4_0"}


def table(reports: list[dict]) -> str:
    """The per-rank rates as a table."""
    kinds = " ".join(f"{_LABEL[k]:>7}" for k in sh.KINDS)
    lines = [f"{'':34} {'decode GB/s':^31} | {'prefill GFLOP/s':^31} |",
             f"{'rank':>4} {'host':12} {'backend':8} {'threads':>7} {kinds} | {kinds} | {'free':>9} "
             f"{'held':>5}  profile"]
    for r in reports:
        gbps = " ".join(f"{r['decode_gbps'][k]:>7.2f}" for k in sh.KINDS)
        gflops = " ".join(f"{r['gemm'][k] / 1e9:>7.1f}" for k in sh.KINDS)
        lines.append(f"{r['rank']:>4} {r['host'][:12]:12} {r['backend'][:8]:8} {r['threads']:>7} {gbps} | "
                     f"{gflops} | {format_bytes(r['free']):>9} {_held(r):>5}  "
                     f"{'reused' if r['reused'] else 'measured'} ({r['device']}, {r['measured']})")
    return "\n".join(lines)


def _held(report: dict) -> str:
    return "-" if report.get("held") is None else f"{100 * report['held']:.0f}%"


def held_note(reports: list[dict]) -> str:
    """A line for ranks the kernel kept waiting while they measured, or nothing."""
    busy = [f"rank {r['rank']} ({100 * r['held']:.0f}%)" for r in reports if (r.get("held") or 0.0) > 0.2]
    if not busy:
        return ""
    return (f"\nheld: the part of the time the kernel kept a rank waiting for a CPU while it measured: "
            f"{', '.join(busy)}. Another program (or a CPU quota) is taking those cores; LLM decoding "
            "gives a rank held more than half the time no share.")


def suggestions(reports: list[dict]) -> str:
    """The shares each kind of work would get, as ``--weights`` values."""
    lines = ["suggested shares (proportional to speed; --weights auto chooses them, capped by memory):"]
    for work, what in (("decode", "LLM decoding"), ("gemm", "prefill and matmul jobs")):
        for kind in sh.KINDS:
            split = sh.decode_shares(reports, kind) if work == "decode" else sh.suggested(reports, work, kind)
            shares = ",".join(f"{s:g}" for s in split)
            lines.append(f"  {what:24} {_LABEL[kind]:>6} weights: --weights {shares}")
    return "\n".join(lines)


def main(backends: str | None = None, accel: str | None = None, remeasure: bool = False,
         seconds: float = 0.15) -> int:
    with session.driving() as cl:
        try:
            cl.configure(backends_=_split(backends), accel=_accel(accel))
            print(f"cmatrix bench: {cl.size} rank(s); measuring where no profile is saved"
                  f"{' (remeasuring all)' if remeasure else ''}...", file=sys.stderr, flush=True)
            reports = speed.profiles(cl.driver, remeasure=remeasure, seconds=seconds)
        except CMatrixError as exc:
            print(f"cmatrix bench: {exc}", file=sys.stderr)
            cl.exit_status = 1
            return 1
        print(table(reports) + held_note(reports))
        print()
        print(suggestions(reports))
        saved = sorted({r["saved"] for r in reports})
        print(f"\nprofiles: {', '.join(saved)}")
        sys.stdout.flush()
        return cl.exit_status
