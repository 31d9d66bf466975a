"""The seed's API, ``cluster_matrix``, as a thin layer over the native one (see
docs/seed-migration.md): ``matrix`` the class, ``setup`` its cluster lists, ``nodeops``
its node-side operations, ``values`` how it takes and gives data."""

from ..io.store import convert_bin_matrix_to_pt
from .matrix import cluster_matrix
from .setup import cluster_zmq
from .values import check_combined_result_values

__all__ = ["cluster_matrix", "cluster_zmq", "check_combined_result_values", "convert_bin_matrix_to_pt"]
