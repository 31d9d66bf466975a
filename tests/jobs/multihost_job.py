"""cmatrix on several hosts (tests/test_multihost_mpi.py's namespace cluster).

Run: mpiexec -f HOSTFILE -n N python -m cmatrix run tests/jobs/multihost_job.py MODE [ARGS]

- ``hold SECONDS``: starts the cluster, multiplies once, and waits.
- ``ranks``: prints ``RANKS`` and the ranks table as JSON (host, local rank, device).
- ``seed IPS_JSON``: the seed API with one real address per rank (``node_IP_list``): a split
  product checked against numpy; a list naming an address of no rank is refused.
- ``cache save|load``: a named, cached weight (each rank's shard in its own host's cache
  folder) and a product with it; ``load`` (a new job) sends no weight data.
- ``llm MODEL PARALLEL [WEIGHTS_JSON]``: 24 greedy tokens; prints ``TOKENS`` and the layout as JSON.
"""

import json
import sys

import numpy as np

import cmatrix as cm

mode = sys.argv[1]
rng = np.random.default_rng(3)
x = rng.standard_normal((4, 64), dtype=np.float32)
w = rng.standard_normal((64, 96), dtype=np.float32)

if mode == "ranks":
    cl = cm.init()
    print("RANKS " + json.dumps([{"rank": r.rank, "host": r.host, "local_rank": r.local_rank,
                                  "device": r.device, "threads": r.threads} for r in cl.ranks]))
elif mode == "hold":  # a cluster that stays up a while (for a look at its sockets)
    import time

    cl = cm.init()
    cl.matmul(x, cl.shard(w))  # every rank has talked to the driver
    print("HOLDING", flush=True)
    time.sleep(float(sys.argv[2]))
elif mode == "seed":
    from cmatrix import InputError, cluster_matrix

    ips = json.loads(sys.argv[2])
    n = len(ips)
    lists = dict(node_IP_list=ips, CPU_GPU_select_list=[True] * n, node_percentages=[1 / n] * n,
                 back_end_select_list=["torch"] * n)
    import torch

    a = cluster_matrix(matrix_file_path=torch.from_numpy(x), split_matrix=False, dim=1, **lists)
    b = cluster_matrix(matrix_file_path=torch.from_numpy(w), split_matrix=True, dim=1, **lists)
    got = np.asarray(a.cluster_shard_operation(b, False, False, True))
    err = float(np.abs(got - x @ w).max())
    print(f"SEED max error {err:.2e}")
    assert err < 1e-3, err
    try:
        cluster_matrix(matrix_file_path=torch.from_numpy(w), split_matrix=True, dim=1,
                       **{**lists, "node_IP_list": ["10.254.254.254"] + ips[1:]})
    except InputError as exc:
        print(f"SEED refused: {exc}")
    else:
        sys.exit("an address of no rank was accepted")
elif mode == "cache":
    cl = cm.init()
    before = cl.stats()["bytes_moved"]
    W = cl.shard(w if sys.argv[2] == "save" else None, name="multihost.w", cache=sys.argv[2])
    if sys.argv[2] == "load":
        assert cl.stats()["bytes_moved"] == before, "a load from the hosts' caches sent weight data"
    err = float(np.abs(cl.matmul(x, W) - x @ w).max())
    print(f"CACHE {sys.argv[2]} max error {err:.2e}")
    assert err < 1e-3, err
elif mode == "llm":
    cl = cm.init(weights=json.loads(sys.argv[4]) if len(sys.argv) > 4 else None)
    model = cm.llm.load(cl, sys.argv[2], parallel=sys.argv[3], rebalance=False)
    result = model.generate(token_ids=[5, 17, 42, 7, 99], max_new_tokens=24, stop_token_ids=[])
    print("TOKENS " + json.dumps(result.token_ids))
    print("LAYOUT " + json.dumps({"note": model.layout_note, "layout": model.layout()}))
else:
    sys.exit(f"unknown mode {mode}")
