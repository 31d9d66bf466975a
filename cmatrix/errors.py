"""Exception types. Every error cmatrix raises is a :class:`CMatrixError`."""

from __future__ import annotations

from dataclasses import dataclass


class CMatrixError(Exception):
    """Base class of every error cmatrix raises."""


class InputError(CMatrixError, ValueError):
    """Bad input refused on the driver before any data moved."""


class CacheError(CMatrixError):
    """A cached matrix cannot be used: missing or stale on some ranks.

    ``problems`` holds one dict per rank that cannot reuse its shard, with
    ``rank``, ``host``, ``file`` and ``problem`` (what differs).
    """

    def __init__(self, message: str, problems: list[dict]):
        super().__init__(message)
        self.problems = list(problems)


class SinkError(CMatrixError):
    """A result was computed but could not be written to its ``out=`` file.

    ``result`` holds it (numpy or torch, as it would have been returned), so nothing
    computed is lost; the message names the destination and the cause.
    """

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class ClusterClosedError(CMatrixError):
    """The cluster was shut down; no further operations are possible."""


@dataclass(frozen=True)
class RankFailure:
    """What one rank reports when a step of an operation failed there."""

    rank: int
    host: str
    backend: str
    op: str
    phase: str
    error: str
    traceback: str

    def headline(self) -> str:
        return (
            f"rank {self.rank} on host {self.host} (backend {self.backend}) "
            f"failed in {self.op}/{self.phase}: {self.error}"
        )


class RankError(CMatrixError):
    """One or more ranks failed during an operation.

    ``failures`` holds a :class:`RankFailure` per failing rank, each with the
    remote traceback. The cluster stays usable: every rank abandoned the
    operation at the same step.
    """

    def __init__(self, failures: list[RankFailure]):
        self.failures = list(failures)
        lines = [f.headline() for f in self.failures]
        for f in self.failures:
            lines.append(f"--- traceback from rank {f.rank} ({f.host}) ---")
            lines.append(f.traceback.rstrip())
        super().__init__("\n".join(lines))

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.failures]
