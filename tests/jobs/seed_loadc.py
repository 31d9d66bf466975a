"""loadC in a later job: run once with "saveC" (shards kept and written to the nodes' disks),
then again with "loadC" (nothing sent: the shards come back from the disks).

Run: mpiexec -n N python seed_loadc.py saveC|loadC   (plain; CMATRIX_CACHE_DIR shared by both)
Prints "loadc: MODE ok on N ranks".
"""

import os
import sys

import torch
from cluster_matrix_v1 import cluster_matrix, cluster_zmq

mode = sys.argv[1]
n = int(os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)
torch.manual_seed(0)
w, x = torch.randn(48, 20), torch.randn(5, 48)
z = cluster_zmq(["127.0.0.1"] * n)
X = cluster_matrix(x, cluster_zmq_object=z, split_matrix=False, auto_set_up=[1, "save"], matrix_name="x")
W = cluster_matrix(w if mode == "saveC" else None, cluster_zmq_object=z, split_matrix=True, dim=1,
                   auto_set_up=[1, mode], matrix_name="loadc_w")
before = X.cluster.stats()["bytes_moved"]
got = X.cluster_shard_operation(W, False, False, True)
if not torch.allclose(got, x @ w, rtol=1e-5, atol=1e-5):
    sys.exit(f"loadc: {mode} gave a wrong product")
print(f"loadc: {mode} ok on {n} ranks")
