"""``cmatrix launch``'s watch over its job: Ctrl-C goes to the driver only, and when a rank
dies (a signal, the kernel's OOM killer), say which one in one line, with its host and backend.

The launcher runs in a session of its own, so the terminal's Ctrl-C reaches ``cmatrix
launch`` alone, which hands it to rank 0 (when rank 0 runs on this machine): the job decides
what it means (``chat`` stops the answer and goes on; a job ends as after Ctrl-C). Open MPI's
launcher would end the whole job on the first Ctrl-C; MPICH's forwards it to every rank.
A third Ctrl-C, or a hang-up or SIGTERM to ``cmatrix launch``, ends the launcher and the job.

Each rank leaves a card (rank, host, pid, backend) in the job's folder, ``CMATRIX_JOB_DIR``
(see :func:`cmatrix.engine.launch.write_rank_card`). The launcher's output passes through
unchanged; after a failed job the lines in which MPICH or Open MPI report a dead process
(its pid, and the signal or exit code) are matched against the cards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

#: MPICH: "PID 123 RUNNING AT host" then "KILLED BY SIGNAL: 9" or "EXIT CODE: 9";
#: Open MPI: "... process rank 1 with PID 123 on node host exited on signal 9 (Killed)."
_MPICH_PID = re.compile(r"PID (\d+) RUNNING AT (\S+)")
_MPICH_HOW = re.compile(r"(?:KILLED BY SIGNAL|EXIT CODE): (\d+)")
_OPENMPI = re.compile(r"rank\s+(\d+)\s+with\s+PID\s+(\d+)\s+on\s+node\s+(\S+)\s+exited\s+on\s+signal\s+(\d+)")


def run(cmd: list[str] | Callable[[dict], list[str]], env: dict) -> int:
    """Run the launcher; relay its output; name a rank that died. Returns its exit status.

    ``cmd`` may be a function of the job's environment (``env`` plus ``CMATRIX_JOB_DIR``),
    for a command that names the variables it passes on."""
    with tempfile.TemporaryDirectory(prefix="cmatrix-job-") as folder:
        env = {**env, "CMATRIX_JOB_DIR": folder}
        if callable(cmd):
            cmd = cmd(env)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        ending = _end_with_us(proc)
        tail: deque[bytes] = deque(maxlen=64)
        relays = [threading.Thread(target=_relay, args=(stream, out, tail), daemon=True)
                  for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for t in relays:
            t.start()
        interrupts = 0
        try:
            while True:
                try:
                    status = proc.wait()
                    break
                except KeyboardInterrupt:
                    interrupts += 1
                    _interrupt(proc, Path(folder), interrupts)
        finally:
            ending()
        for t in relays:
            t.join()
        if status != 0:
            for line in dead_ranks(b"".join(tail).decode(errors="replace"), Path(folder)):
                print(f"cmatrix: {line}", file=sys.stderr, flush=True)
        return status


def _interrupt(proc: subprocess.Popen, folder: Path, count: int) -> None:
    """The user's Ctrl-C number ``count``: to rank 0 when it runs here (the first two: the
    job's own handling, then its way to stop in the middle of an operation), else to the
    launcher; the third ends the launcher."""
    if count >= 3:
        print("\ncmatrix: ending the job", file=sys.stderr, flush=True)
        proc.terminate()
        return
    try:
        card = json.loads((folder / "rank0.json").read_text())
        if card.get("host") in (socket.gethostname(), socket.getfqdn()):
            os.kill(int(card["pid"]), signal.SIGINT)
            return
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass  # no card yet, or rank 0 is elsewhere (or gone): the launcher passes it on
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGINT)


def _end_with_us(proc: subprocess.Popen):
    """The launcher lives in its own session, so a closed terminal (SIGHUP) or a SIGTERM to
    ``cmatrix launch`` would leave it running: end it then. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def end(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            proc.terminate()
        raise SystemExit(128 + signum)

    names = [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]
    before = {name: signal.signal(getattr(signal, name), end) for name in names}

    def undo() -> None:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)

    return undo


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
