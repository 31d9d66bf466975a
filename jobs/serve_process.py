"""`cmatrix launch -n N serve` as a background process, for the benchmarks and the tests:
its address read from what it prints, stopped as Ctrl-C would stop it.

    server = ServeProcess(2, "models/tiny-llama", "--backends", "ggml")
    ...  # OpenAI(base_url=server.url + "/v1")
    server.stop()
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ADDRESS = re.compile(r" at (http://[\d.]+:\d+)/")


class ServeProcess:
    """The server on ``ranks`` ranks for ``model`` (extra ``args`` go to ``cmatrix serve``;
    ``env``: the whole environment). Raises RuntimeError if it does not start within
    ``timeout`` seconds."""

    def __init__(self, ranks: int, model: str | Path, *args: str, env: dict | None = None,
                 timeout: float = 180) -> None:
        argv = [sys.executable, "-m", "cmatrix", "launch", "-n", str(ranks), "serve", "--model", str(model),
                "--port", "0", *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                if self.url is None and (found := ADDRESS.search(line)):
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + self.log[-5000:])

    @property
    def log(self) -> str:
        """What the server printed (stderr) so far."""
        return "".join(self.lines)

    def stop(self) -> int:
        """Ctrl-C, then (after a minute) SIGKILL; the exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
