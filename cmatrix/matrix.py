"""Handles to matrices that live on the ranks (the driver holds only metadata)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .plan import Plan

if TYPE_CHECKING:
    from .cluster import Cluster


class Matrix:
    """A matrix resident on the cluster. Free it with :meth:`free` when done;
    a handle that is garbage-collected is freed with the next command."""

    def __init__(self, cluster: Cluster, ident: int, shape: tuple[int, int], dtype: str,
                 name: str | None, kind: str) -> None:
        self._cluster = cluster
        self.id = ident
        self.shape = tuple(shape)
        self.dtype = dtype
        self.name = name
        #: "numpy" or "torch": what gathered results come back as
        self.kind = kind
        self.freed = False
        #: True when shard(..., cache=...) made it: it can be freed with its files
        self.cached = False

    def gather(self) -> Any:
        """The whole matrix on the driver (numpy or torch, as it came in)."""
        return self._cluster.gather(self)

    def free(self, disk: bool = False) -> None:
        """Release this matrix's memory on every rank; ``disk=True`` also deletes
        its cache files (a matrix sharded with ``cache=``)."""
        if disk:
            self._cluster.free(self, disk=True)
            return
        if not self.freed:
            self.freed = True
            self._cluster._free_now([self.id])

    def __del__(self) -> None:
        if not getattr(self, "freed", True):
            self._cluster._free_later(self.id)

    def __copy__(self) -> Matrix:
        # Two handles to one resident block would free it twice.
        raise TypeError("cluster matrix handles cannot be copied; share the handle instead")

    def __deepcopy__(self, memo: dict) -> Matrix:
        return self.__copy__()


class ShardedMatrix(Matrix):
    """A matrix split along ``axis`` with ``counts[r]`` rows/columns on rank r."""

    def __init__(self, cluster: Cluster, ident: int, shape: tuple[int, int], dtype: str,
                 plan: Plan, name: str | None = None, kind: str = "numpy", quant: str | None = None,
                 quant_axis: int = 0) -> None:
        super().__init__(cluster, ident, shape, dtype, name, kind)
        self.plan = plan
        #: "q8_0"/"q4_0" when the blocks are quantised along ``quant_axis``
        self.quant = quant
        self.quant_axis = quant_axis

    @property
    def axis(self) -> int:
        return self.plan.axis

    @property
    def counts(self) -> tuple[int, ...]:
        return self.plan.counts

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        state = " freed" if self.freed else ""
        dtype = f"{self.quant} (axis {self.quant_axis})" if self.quant else self.dtype
        return (f"<ShardedMatrix{label} {self.shape[0]}x{self.shape[1]} {dtype} "
                f"axis={self.axis} counts={list(self.counts)}{state}>")


class ReplicatedMatrix(Matrix):
    """A matrix held whole by every rank (e.g. activations reused across calls)."""

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        state = " freed" if self.freed else ""
        return f"<ReplicatedMatrix{label} {self.shape[0]}x{self.shape[1]} {self.dtype}{state}>"
