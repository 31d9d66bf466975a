"""Handles to matrices the ranks hold, and how results reach the user.

The driver holds only metadata; a handle's :meth:`~Matrix.gather` is the ``gather``
command (both halves below). An operation's result is either kept on the ranks (a new
handle, :func:`keep` on each rank), brought to the driver as numpy or torch like its
inputs, or written to a file sink (:func:`deliver`).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.arrays import to_user
from ..core.dtypes import ITEMSIZE, empty
from ..core.plan import Plan
from ..engine import faults
from ..engine.driver import Driver
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import InputError, SinkError
from ..io import sinks


class Matrix:
    """A matrix resident on the cluster. Free it with :meth:`free` when done;
    a handle that is garbage-collected is freed with the next command."""

    def __init__(self, driver: Driver, ident: int, shape: tuple[int, int], dtype: str,
                 name: str | None, kind: str) -> None:
        self.driver = driver
        self.id = ident
        self.shape = tuple(shape)
        self.dtype = dtype
        self.name = name
        #: "numpy" or "torch": what gathered results come back as
        self.kind = kind
        self.freed = False

    #: True for a matrix sharded with ``cache=...`` (:class:`cmatrix.ops.cache.CachedMatrix`)
    cached = False

    def gather(self) -> Any:
        """The whole matrix on the driver (numpy or torch, as it came in)."""
        return gather(self.driver, self)

    def free(self, disk: bool = False) -> None:
        """Release this matrix's memory on every rank; ``disk=True`` also deletes
        its cache files (a matrix sharded with ``cache=``)."""
        if disk:
            raise InputError("disk=True: this matrix was not sharded with cache=..., it has no files")
        if not self.freed:
            self.freed = True
            self.driver.free([self.id])

    def __del__(self) -> None:
        if not getattr(self, "freed", True):
            self.driver.free_later(self.id)

    def __copy__(self) -> Matrix:
        # Two handles to one resident block would free it twice.
        raise TypeError("cluster matrix handles cannot be copied; share the handle instead")

    def __deepcopy__(self, memo: dict) -> Matrix:
        return self.__copy__()


class ShardedMatrix(Matrix):
    """A matrix split along ``axis`` with ``counts[r]`` rows/columns on rank r."""

    def __init__(self, driver: Driver, ident: int, shape: tuple[int, int], dtype: str,
                 plan: Plan, name: str | None = None, kind: str = "numpy", quant: str | None = None,
                 quant_axis: int = 0) -> None:
        super().__init__(driver, ident, shape, dtype, name, kind)
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


def check_live(driver: Driver, m: Any, arg: str) -> None:
    """``m`` must be a handle of this driver's cluster that was not freed."""
    if not isinstance(m, Matrix) or m.driver is not driver:
        raise InputError(f"{arg}: expected a matrix handle from this cluster, got {type(m).__name__}")
    if m.freed:
        raise InputError(f"{arg}: {m!r} was freed")


def result_kind(*kinds: str) -> str:
    """What a result of these operands comes back as: torch if any is torch."""
    return "torch" if "torch" in kinds else "numpy"


def kept(driver: Driver, ident: int, shape: tuple[int, int], dtype: str, plan: Plan | None,
         kind: str) -> Matrix:
    """The handle of a result left on the ranks: sharded by ``plan``, or replicated (None)."""
    if plan is None:
        return ReplicatedMatrix(driver, ident, shape, dtype, None, kind)
    return ShardedMatrix(driver, ident, shape, dtype, plan, None, kind)


def check_room(sink: sinks.Sink, shape: tuple[int, ...], dtype: str) -> None:
    """A file sink must have room for a result of ``shape`` and ``dtype`` (checked before the
    product: its size is known then). An HDF5 file is rewritten whole, so it counts too."""
    if not sink.is_file:
        return
    need = math.prod(shape) * ITEMSIZE[dtype] + (1 << 20)
    if sink.kind == "h5" and sink.path.is_file():
        need += sink.path.stat().st_size
    folder = Path(os.path.abspath(sink.path.parent))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise InputError(f"out: {sink.path} needs about {need >> 20} MiB and {folder} has "
                         f"{free >> 20} MiB free; free some space or write elsewhere")


def deliver(sink: sinks.Sink, op: str, data: np.ndarray, dtype: str, kind: str,
            attrs: dict | None = None) -> Any:
    """A result on the driver: written to a file sink (its location returned), else as numpy
    or torch. ``attrs``: what the file records of the operation (see :func:`sinks.describe`)."""
    if not sink.is_file:
        return to_user(data, dtype, kind)

    def written(_: int) -> None:
        faults.check(op, "mid-write", 0)  # tests kill the driver here

    try:
        return sinks.deliver(sink, data, dtype, attrs or {}, written)
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:  # a full disk, h5py, ...
        where = f"{sink.path}#{sink.dataset}" if sink.dataset else str(sink.path)
        raise SinkError(f"out: the result of {op} could not be written to {where}: {type(exc).__name__}: "
                        f"{exc}; it is in this error's .result", to_user(data, dtype, kind)) from exc


def keep(rt: Runtime, ident: int, y: Any, dtype: str) -> None:
    """Rank side: keep a result resident, rounded to its declared dtype like a gathered one."""
    if dtype != "float32":
        y = rt.backend.upload(rt.backend.download(y, dtype), dtype)
    rt.store(ident, y)


# ---- gather: the whole matrix on the driver ---------------------------------------------

@dataclass(frozen=True)
class Gather(Header, op="gather"):
    id: int
    shape: tuple[int, int]
    dtype: str
    axis: int
    counts: tuple[int, ...]


def gather(driver: Driver, m: Matrix) -> Any:
    """The whole matrix ``m`` on the driver, as numpy or torch like its source."""
    check_live(driver, m, "m")
    if isinstance(m, ReplicatedMatrix):  # the driver holds a copy: no command needed
        rt = driver.runtime
        data = rt.backend.download(rt.block(m.id), m.dtype).copy()
    else:
        data = driver.run(Gather(m.id, m.shape, m.dtype, m.axis, m.counts))
    return to_user(data, m.dtype, m.kind)


@on_ranks(Gather)
def _gather(rt: Runtime, h: Gather, _: Any) -> np.ndarray | None:
    with rt.step("download"):
        part = rt.backend.download(rt.block(h.id), h.dtype)
        full = empty(h.shape, h.dtype) if rt.comm.is_driver else None
    rt.sync()
    rt.comm.gather_blocks(part, full, Plan(h.axis, h.counts))
    return full
