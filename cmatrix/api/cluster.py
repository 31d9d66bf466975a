"""The driver's view of the cluster: :class:`Cluster`, one facade over every command family.

Each family module in :mod:`cmatrix.ops` contributes its public methods as a mixin whose
only hook is ``driver`` (a :class:`~cmatrix.engine.driver.Driver`); every method checks
its arguments first, so bad input is refused before any data moves, then runs one
command on every rank.
"""

from __future__ import annotations

from typing import Any

from ..engine.driver import Driver
from ..engine.ranks import RankTable
from ..ops.attention import AttentionMethods
from ..ops.cache import CacheMethods
from ..ops.elementwise import ElementwiseMethods
from ..ops.grid import GridMethods
from ..ops.matmul import MatmulMethods
from ..ops.nodeops import NodeOpMethods
from ..ops.setup import SetupMethods
from ..ops.speed import SpeedMethods


class Cluster(SetupMethods, CacheMethods, MatmulMethods, ElementwiseMethods, NodeOpMethods,
              AttentionMethods, GridMethods, SpeedMethods):
    """Handle the driver uses to shard matrices and run operations on all ranks.

    Placement: :meth:`shard`, :meth:`replicate`, :meth:`gather`, :meth:`free`,
    :meth:`cached`. Products: :meth:`matmul`, :meth:`add`, :meth:`sub`, and grid mode
    (:meth:`grid_matmul`, :meth:`grid_add`, :meth:`grid_sub`). Node-side operations:
    :meth:`silu`, :meth:`gelu`, :meth:`softmax`, :meth:`rms_norm`, :meth:`rope`,
    :meth:`repeat_kv`, :meth:`attention`. Set-up: :meth:`configure`, :meth:`probe`,
    :meth:`speed_profiles`.
    """

    def __init__(self, driver: Driver) -> None:
        #: the interface op modules, cm.nn and cm.llm use to run commands
        self.driver = driver

    @property
    def size(self) -> int:
        """Number of ranks (device slots), driver included."""
        return self.driver.size

    @property
    def weights(self) -> Any:
        """The per-rank shares used when an operation is given none."""
        return self.driver.weights

    @property
    def ranks(self) -> RankTable:
        """Rank, host, local rank, backend, device, memory, share and threads of every rank."""
        return self.driver.ranks

    @property
    def closed(self) -> bool:
        return self.driver.closed

    @property
    def exit_status(self) -> int:
        """The status the workers exit with when the job ends."""
        return self.driver.exit_status

    @exit_status.setter
    def exit_status(self, status: int) -> None:
        self.driver.exit_status = status

    def stats(self) -> dict[str, int]:
        """Commands sent and bytes of array data moved between ranks so far."""
        return self.driver.stats()

    def shutdown(self, status: int = 0) -> None:
        """Tell every worker to exit with ``status``; the cluster is unusable afterwards."""
        self.driver.shutdown(status)
