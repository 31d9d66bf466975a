"""``cmatrix launch``'s watch over its job: when a rank dies (a signal, the kernel's OOM
killer), say which one in one line, with its host and backend.

Each rank leaves a card (rank, host, pid, backend) in the job's folder, ``CMATRIX_JOB_DIR``
(see :func:`cmatrix.engine.launch.write_rank_card`). The launcher's output passes through
unchanged; after a failed job the lines in which MPICH or Open MPI report a dead process
(its pid, and the signal or exit code) are matched against the cards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

#: MPICH: "PID 123 RUNNING AT host" then "KILLED BY SIGNAL: 9" or "EXIT CODE: 9";
#: Open MPI: "... process rank 1 with PID 123 on node host exited on signal 9 (Killed)."
_MPICH_PID = re.compile(r"PID (\d+) RUNNING AT (\S+)")
_MPICH_HOW = re.compile(r"(?:KILLED BY SIGNAL|EXIT CODE): (\d+)")
_OPENMPI = re.compile(r"rank\s+(\d+)\s+with\s+PID\s+(\d+)\s+on\s+node\s+(\S+)\s+exited\s+on\s+signal\s+(\d+)")


def run(cmd: list[str], env: dict) -> int:
    """Run the launcher; relay its output; name a rank that died. Returns its exit status."""
    with tempfile.TemporaryDirectory(prefix="cmatrix-job-") as folder:
        env = {**env, "CMATRIX_JOB_DIR": folder}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tail: deque[bytes] = deque(maxlen=64)
        relays = [threading.Thread(target=_relay, args=(stream, out, tail), daemon=True)
                  for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for t in relays:
            t.start()
        try:
            status = proc.wait()
        except KeyboardInterrupt:  # the launcher got the same Ctrl-C and ends the ranks
            status = proc.wait()
        for t in relays:
            t.join()
        if status != 0:
            for line in dead_ranks(b"".join(tail).decode(errors="replace"), Path(folder)):
                print(f"cmatrix: {line}", file=sys.stderr, flush=True)
        return status


def _relay(stream, out, tail: deque) -> None:
    """Pass output on as it comes (chunks, not lines: a progress bar redraws within a line)."""
    passing = True
    while chunk := os.read(stream.fileno(), 1 << 16):
        tail.append(chunk)
        if passing:
            try:
                out.buffer.write(chunk)
                out.flush()
            except (BrokenPipeError, OSError):  # e.g. | head: keep draining, or the job would block
                passing = False


def dead_ranks(text: str, folder: Path) -> list[str]:
    """One line per rank the launcher reported dead, named from the ranks' cards."""
    cards = {}
    for path in folder.glob("rank*.json"):
        try:
            card = json.loads(path.read_text())
            cards[int(card["pid"])] = card
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
    found: dict[int, tuple[str, int | None]] = {}  # pid -> (host, signal or exit code)
    for m in _OPENMPI.finditer(text):
        found[int(m.group(2))] = (m.group(3), int(m.group(4)))
    for m in _MPICH_PID.finditer(text):
        how = _MPICH_HOW.search(text, m.end())
        found[int(m.group(1))] = (m.group(2), int(how.group(1)) if how else None)
    report = []
    for pid, (host, code) in found.items():
        card = cards.get(pid, {})
        who = (f"rank {card['rank']} on host {card.get('host', host)} (backend {card.get('backend', '?')}, "
               f"pid {pid})" if "rank" in card else f"a rank on host {host} (pid {pid})")
        report.append(f"{who} {_how(code)}; the job ended")
    return report


def _how(code: int | None) -> str:
    if code is None:
        return "died"
    try:
        name = signal.Signals(code).name
    except ValueError:
        return f"exited with code {code}"
    return f"was killed by signal {code} ({name}{', often the out-of-memory killer' if code == 9 else ''})"
