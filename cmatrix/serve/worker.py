"""The server's generation worker: requests wait in one queue and run one at a time on the
process's main thread (the only thread that calls MPI), while the HTTP server runs in
another thread. Text goes back to the request's event loop as it is decoded.

The worker also keeps the dashboard: per rank, its host, backend, device, memory, share,
compute milliseconds per token and bytes it sent per token, read from the ranks about once
a second while generating (one small gather between two tokens).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from typing import Any

from ..errors import CMatrixError, InputError
from ..llm.chat import Transcript
from .openai_api import Completion

#: seconds between two dashboard reads while generating
STATS_EVERY = 1.0


class Job:
    """A request in the queue: its completion, the events for its handler, and whether its
    client has gone (then it is skipped, or stopped between two tokens)."""

    def __init__(self, completion: Completion, loop: asyncio.AbstractEventLoop) -> None:
        self.completion, self.loop = completion, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, kind: str, value: Any = None) -> None:
        """Hand an event ("text", "done" with the result, "error" with a message) to the handler."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server's loop is gone: nobody is listening
            self.cancelled.set()


class Worker:
    """Runs queued jobs on ``model`` with K/V cache reuse between requests."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.transcript = Transcript(model.tokenizer)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.busy = False
        self.served = 0
        self.dashboard: dict = {}
        self._last: list[dict] | None = None  # the ranks' totals at the last read
        self._rates: dict[int, tuple[float, float, float]] = {}
        self._read_at = 0.0
        self.refresh()

    def submit(self, job: Job) -> None:
        """Queue ``job`` behind the others."""
        self.jobs.put(job)

    def run(self, stop: threading.Event) -> None:
        """Serve jobs until ``stop`` is set (KeyboardInterrupt goes through: Ctrl-C stops)."""
        while not stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                self._run(job)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a bug here must not leave the client waiting, nor end the server
                traceback.print_exc()
                job.emit("error", f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        c = job.completion

        def cancel() -> bool:
            if time.monotonic() - self._read_at >= STATS_EVERY:
                self.refresh()
            return job.cancelled.is_set()

        ids, options = c.ids, dict(c.options)
        if c.text is not None:  # a chat that may continue the last one: its answer's own tokens
            ids = self.transcript.ids_for(c.text)
            room = self.model.config.max_positions - len(ids)
            if room < 1:
                ids, room = c.ids, self.model.config.max_positions - len(c.ids)
            options["max_new_tokens"] = min(options["max_new_tokens"], room)
        pending: list[str] = []

        def token(_: int) -> None:  # one chunk per token, as llama.cpp's server sends them
            job.emit("text", "".join(pending))
            pending.clear()

        try:
            result = self.model.generate(token_ids=ids, stream=pending.append, on_token=token, cancel=cancel,
                                         reuse_cache=True, **options)
        except InputError as exc:  # refused before anything ran (the request was checked already)
            job.emit("error", str(exc))
            return
        except CMatrixError as exc:
            job.emit("error", f"the cluster failed: {exc}")
            return
        except KeyboardInterrupt:
            job.emit("error", "the server is stopping")
            raise
        if pending:  # text the last token completed only once generation ended
            job.emit("text", "".join(pending))
        if c.text is not None:
            self.transcript.record(c.text, ids, result)
        self.served += 1
        job.emit("done", result)
        print(f"cmatrix serve: {c.ident} ({c.kind}): {result.summary()}", file=sys.stderr, flush=True)
        if result.stop_reason == "interrupted":  # Ctrl-C while decoding: the server stops
            raise KeyboardInterrupt
        try:
            self.refresh()
        except CMatrixError as exc:  # the next request will meet the failure too, and say it
            print(f"cmatrix serve: could not read the ranks' figures: {exc}", file=sys.stderr, flush=True)

    def refresh(self) -> None:
        """Read the ranks' totals; the dashboard shows rates since the previous read that had
        decode steps (so it keeps the last generation's figures while idle)."""
        now = self.model.rank_stats()
        self._read_at = time.monotonic()
        last, self._last = self._last, now
        rows = []
        for r in now:
            before = last[r["rank"]] if last else None
            steps = r["steps"] - (before["steps"] if before else 0)
            if steps > 0:
                compute = r["seconds"] - r["collective_seconds"] - \
                    (before["seconds"] - before["collective_seconds"] if before else 0.0)
                wait = r["collective_seconds"] - (before["collective_seconds"] if before else 0.0)
                moved = r["bytes_sent"] - (before["bytes_sent"] if before else 0)
                self._rates[r["rank"]] = (1e3 * compute / steps, 1e3 * wait / steps, moved / steps)
            ms, wait_ms, per_token = self._rates.get(r["rank"], (None, None, None))
            rows.append({"rank": r["rank"], "host": r["host"], "backend": r["backend"], "device": r["device"],
                         "memory_used": r["memory_used"], "memory": r["memory"], "share": r["share"],
                         "decoder": self.model.decoders[r["rank"]], "weights": r["weights"],
                         "compute_ms_per_token": ms,
                         "wait_ms_per_token": wait_ms, "bytes_sent_per_token": per_token,
                         "decode_steps": r["steps"]})
        busy = [row["compute_ms_per_token"] for row in rows
                if row["compute_ms_per_token"] is not None and row["share"] > 0]
        moves = self.model.balancer.moves
        self.dashboard = {"model": self.model.name, "ranks": rows, "busy": self.busy,
                          "imbalance": max(busy) * len(busy) / sum(busy) if busy and sum(busy) > 0 else None,
                          "rebalances": len(moves), "last_rebalance": moves[-1] if moves else None,
                          "queued": self.jobs.qsize(), "served": self.served,
                          "cached_tokens": len(self.model.cached_ids), "updated": time.time()}
