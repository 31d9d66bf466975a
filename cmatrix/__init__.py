"""cmatrix: dense matrix work and LLM layers across the computers you already own.

    import cmatrix as cm
    cl = cm.init()                       # rank 0 returns the Cluster; other ranks serve
    W = cl.shard(w, weights=[.5, .3, .2])
    y = cl.matmul(x, W)

The package follows the data path: ``core`` (pure helpers), ``io`` (files), ``backends``
(one per device kind), ``engine`` (MPI, the protocol, the driver), ``ops`` (every command,
both halves), ``api`` (the Cluster facade and init), then ``compat`` (the seed's API),
``llm``, ``nn`` and ``cli`` on top.
"""

from ._version import __version__
from .api.cluster import Cluster
from .api.session import claim_ranks, init
from .compat import check_combined_result_values, cluster_matrix, cluster_zmq  # the seed's API
from .errors import (
    CacheError,
    ClusterClosedError,
    CMatrixError,
    InputError,
    RankError,
    RankFailure,
    SinkError,
)
from .io.store import convert_bin_matrix_to_pt
from .ops.handles import Matrix, ReplicatedMatrix, ShardedMatrix

claim_ranks()  # under mpirun -n N python script.py, worker ranks serve from here on


def __getattr__(name: str):
    # cm.nn needs torch: imported on first use, so cmatrix itself runs without torch.
    if name in ("nn", "llm"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cmatrix' has no attribute {name!r}")


__all__ = [
    "__version__", "init", "Cluster", "Matrix", "ShardedMatrix", "ReplicatedMatrix",
    "CMatrixError", "InputError", "RankError", "RankFailure", "ClusterClosedError", "CacheError", "SinkError",
    "convert_bin_matrix_to_pt", "cluster_matrix", "cluster_zmq", "check_combined_result_values",
]
