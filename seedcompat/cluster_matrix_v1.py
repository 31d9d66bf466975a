"""The seed project's module name, so its scripts run with only their IPs and paths changed:
``from cluster_matrix_v1 import cluster_matrix, cluster_zmq, check_combined_result_values``.

Everything here is cmatrix's seed API (:mod:`cmatrix.compat`); importing it under
``mpirun -n N python script.py`` makes every rank but the driver serve from this line on.
"""

from cmatrix.compat import check_combined_result_values, cluster_matrix, cluster_zmq, convert_bin_matrix_to_pt

__all__ = ["cluster_matrix", "cluster_zmq", "check_combined_result_values", "convert_bin_matrix_to_pt"]
