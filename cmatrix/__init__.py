"""cmatrix: dense matrix work and LLM layers across the computers you already own.

    import cmatrix as cm
    cl = cm.init()                       # rank 0 returns the Cluster; other ranks serve
    W = cl.shard(w, weights=[.5, .3, .2])
    y = cl.matmul(x, W)
"""

__version__ = "0.1.0"

from .cluster import Cluster  # noqa: E402
from .compat import cluster_matrix  # noqa: E402  (the seed's API)
from .errors import (  # noqa: E402
    CacheError,
    ClusterClosedError,
    CMatrixError,
    InputError,
    RankError,
    RankFailure,
)
from .matrix import Matrix, ReplicatedMatrix, ShardedMatrix  # noqa: E402
from .session import init  # noqa: E402
from .store import convert_bin_matrix_to_pt  # noqa: E402


def __getattr__(name: str):
    # cm.nn needs torch: imported on first use, so cmatrix itself runs without torch.
    if name in ("nn", "llm"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cmatrix' has no attribute {name!r}")


__all__ = [
    "__version__", "init", "Cluster", "Matrix", "ShardedMatrix", "ReplicatedMatrix",
    "CMatrixError", "InputError", "RankError", "RankFailure", "ClusterClosedError", "CacheError",
    "convert_bin_matrix_to_pt", "cluster_matrix",
]
