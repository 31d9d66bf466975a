"""Grid mode's transfers (mixed into :class:`cmatrix.engine.comm.Comm`; MPI types and
operations come from it, so comm.py stays the only module importing mpi4py).

Grid mode (cmatrix.ops.grid) packs every rank's blocks into one flat buffer on
the driver, in rank order, and moves it with one Scatterv; results come
back with Gatherv, or (inner-dimension variant) are first summed within
each grid row on a sub-communicator made once per grid shape and cached.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RowGroup:
    """The ranks of one grid row: ``index`` (grid row), this rank's ``rank`` in it
    (its grid column) and ``size`` (q); ``comm`` is None when the group is one rank."""

    def __init__(self, comm: Any, index: int, rank: int, size: int) -> None:
        self.comm, self.index, self.rank, self.size = comm, index, rank, size

    @property
    def is_root(self) -> bool:
        return self.rank == 0


class GridTransfers:
    """Flat Scatterv/Gatherv and per-grid-row sums (see the module docstring)."""

    _row_groups: dict | None = None

    @staticmethod
    def _flat_displs(counts: list[int]) -> list[int]:
        displs, start = [], 0
        for c in counts:
            displs.append(start)
            start += int(c)
        return displs

    def scatter_flat(self, send: np.ndarray | None, recv: np.ndarray, counts: list[int]) -> None:
        """Driver's 1-D ``send`` (rank r's part: ``counts[r]`` elements, parts in rank
        order) -> every rank's 1-D ``recv`` of ``counts[rank]`` elements."""
        counts = [int(c) for c in counts]
        if self.size == 1:
            recv[...] = send[: counts[0]]
            return
        mpitype = self._typed(recv.dtype)
        spec = None
        if self.is_driver:
            self._count((sum(counts) - counts[0]) * send.itemsize)
            spec = [send, counts, self._flat_displs(counts), mpitype]
        self.world.Scatterv(spec, [recv, mpitype], root=0)

    def gather_flat(self, send: np.ndarray, recv: np.ndarray | None, counts: list[int]) -> None:
        """Every rank's 1-D ``send`` (``counts[rank]`` elements) -> the driver's 1-D
        ``recv``, parts in rank order (``recv`` is None on workers)."""
        counts = [int(c) for c in counts]
        if self.size == 1:
            recv[: counts[0]] = send
            return
        mpitype = self._typed(send.dtype)
        spec = None
        if self.is_driver:
            self._count((sum(counts) - counts[0]) * send.itemsize)
            spec = [recv, counts, self._flat_displs(counts), mpitype]
        self.world.Gatherv([send, mpitype], spec, root=0)

    def row_group(self, p: int, q: int) -> RowGroup:
        """This rank's grid row of a p x q grid (rank r = i*q + j is in row i).

        Collective over the world the first time a (p, q) is asked for (the
        sub-communicator is made with ``Split(color=i, key=j)``), cached after.
        A one-rank group needs no communicator.
        """
        if p * q != self.size:
            raise ValueError(f"row_group: a {p} x {q} grid does not fit {self.size} ranks")
        if self._row_groups is None:
            self._row_groups = {}
        group = self._row_groups.get((p, q))
        if group is None:
            i, j = divmod(self.rank, q)
            comm = self.world.Split(color=i, key=j) if q > 1 else None
            group = self._row_groups[(p, q)] = RowGroup(comm, i, j, q)
        return group

    def group_reduce_sum(self, group: RowGroup, partial: np.ndarray, total: np.ndarray | None,
                         moved: int | None = None) -> None:
        """Sum the ``partial`` arrays of ``group``'s ranks into ``total`` on its root
        (group rank 0; ``total`` is None elsewhere). ``moved``: the bytes every group
        of this call moves together, which the driver counts (default: its own group's)."""
        if self.is_driver:
            self._count(partial.nbytes * (group.size - 1) if moved is None else moved)
        if group.size == 1:
            total[...] = partial
            return
        if partial.size == 0:  # every rank of a group holds the same shape: all skip together
            return
        mpitype = self._typed(partial.dtype)
        group.comm.Reduce([partial, mpitype], [total, mpitype] if group.is_root else None,
                          op=self._SUM, root=0)
