"""The rank table: who computes what, where."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RankInfo:
    rank: int
    host: str
    local_rank: int
    local_size: int
    backend: str
    device: str
    weight: float
    threads: int
    fallback: str | None = None
    #: bytes of device memory (host RAM for CPU paths), when known
    memory: int | None = None
    #: dense dtypes the rank's backend computes with
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    #: the measured speed its share came from ("14.2 GB/s decode f32"), when shares were measured
    speed: str = ""
    versions: dict = field(default_factory=dict, compare=False)


class RankTable:
    """Printable, indexable list of :class:`RankInfo`, one per rank."""

    COLUMNS = ("rank", "host", "local", "backend", "device", "memory", "weight", "threads")

    def __init__(self, rows: list[RankInfo]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> RankInfo:
        return self.rows[i]

    def __iter__(self) -> Iterator[RankInfo]:
        return iter(self.rows)

    def with_weights(self, weights: Sequence[float], speeds: Sequence[str] | None = None) -> RankTable:
        """The same ranks with these shares (and the measured speeds they came from, if any)."""
        speeds = [""] * len(self.rows) if speeds is None else speeds
        return RankTable([replace(r, weight=float(w), speed=v)
                          for r, w, v in zip(self.rows, weights, speeds, strict=True)])

    def _cells(self, r: RankInfo, measured: bool) -> tuple[str, ...]:
        device = r.device + (" *" if r.fallback else "")
        return (str(r.rank), r.host, f"{r.local_rank}/{r.local_size}", r.backend, device,
                format_bytes(r.memory), *((r.speed,) if measured else ()), f"{r.weight:.3f}", str(r.threads))

    def __str__(self) -> str:
        measured = any(r.speed for r in self.rows)
        columns = self.COLUMNS[:6] + (("speed",) if measured else ()) + self.COLUMNS[6:]
        table = [columns] + [self._cells(r, measured) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"* rank {r.rank} fell back to {r.device}: {r.fallback}" for r in self.rows if r.fallback]
        return "\n".join(lines)

    __repr__ = __str__


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"
