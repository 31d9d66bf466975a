"""The seed project's test scripts in the form their authors wrote them (``cluster_zmq(IP_list)``
and ``cluster_zmq_object=``, ``from cluster_matrix_v1 import ...``, a prologue that writes random
matrices to files), with only the IP list and the file paths changed.

Run: mpiexec -n N python seed_zmq_scripts.py FOLDER   (plain: every rank starts the script)

Sections follow the seed's scripts: data types, add, send back, single node (N == 1), flash
attention on [B, H, T, D] tensors with the seed's keywords, and a Llama-style layer loop
whose weights are saved once by path and then loaded by the name the path gives, after
the files are gone. Each result goes through the seed's check_combined_result_values;
prints "seed-zmq: K checks, F failures on N ranks".
"""

import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from cluster_matrix_v1 import check_combined_result_values, cluster_matrix, cluster_zmq

FOLDER = sys.argv[1]
N = int(os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)
results = []


def path(name):
    return os.path.join(FOLDER, name)


def check(label, reference, combined):
    print(f"--- {label}")
    results.append((label, check_combined_result_values(reference, combined)))


if __name__ == "__main__":
    # ---- the seed's prologue: random matrices written to files (the driver alone runs it) ----
    A3_float16 = torch.from_numpy(np.random.rand(100, 450).astype(np.float16))
    B3_float16 = torch.from_numpy(np.random.rand(100, 450).astype(np.float16))
    torch.save(A3_float16, path("small_matrixA_float16.pt"))
    torch.save(B3_float16, path("small_matrixB_float16.pt"))
    torch.save(A3_float16 @ B3_float16.T, path("c_ref_float16.pt"))
    A_f32 = torch.randn(64, 96)
    B_f32 = torch.randn(96, 80)
    torch.save(A_f32, path("A_f32.pt"))
    torch.save(B_f32, path("B_f32.pt"))

    IP_list = ["127.0.0.1"] * N  # replaced: the seed's LAN addresses
    percentages = [round(1 / N, 6)] * (N - 1) + [round(1 - round(1 / N, 6) * (N - 1), 6)]
    backend_select_list = ["llama"] * N
    CPU_GPU_select_list = [True] * N
    cluster_zmq_obj = cluster_zmq(IP_list)

    # ---- data types (cluster_matrix_test_dataType.py): A @ B.T, B split by rows ----
    matrixA = cluster_matrix(path("small_matrixA_float16.pt"), cluster_zmq_object=cluster_zmq_obj,
                             CPU_GPU_select_list=CPU_GPU_select_list, node_percentages=percentages,
                             back_end_select_list=backend_select_list, split_matrix=False, dim=0,
                             auto_set_up=[1, "save"])
    matrixB = cluster_matrix(path("small_matrixB_float16.pt"), cluster_zmq_object=cluster_zmq_obj,
                             CPU_GPU_select_list=CPU_GPU_select_list, node_percentages=percentages,
                             back_end_select_list=backend_select_list, split_matrix=True, dim=0,
                             auto_set_up=[1, "save"])
    C = matrixA.cluster_shard_operation(matrixB, False, True, True)
    check("float16 A @ B.T", path("c_ref_float16.pt"), C)
    A32 = cluster_matrix(path("A_f32.pt"), cluster_zmq_object=cluster_zmq_obj, split_matrix=False,
                         auto_set_up=[1, "save"])  # the lists from cluster_zmq's defaults
    B32 = cluster_matrix(path("B_f32.pt"), cluster_zmq_object=cluster_zmq_obj, split_matrix=True, dim=1,
                         auto_set_up=[1, "save"])
    check("float32 A @ B, defaults", A_f32 @ B_f32, A32.cluster_shard_operation(B32, False, False, True))
    bf_a, bf_b = A_f32.to(torch.bfloat16), B_f32.to(torch.bfloat16)
    Abf = cluster_matrix(bf_a, cluster_zmq_object=cluster_zmq_obj, split_matrix=False,
                         auto_set_up=[1, "save"], matrix_name="a_bf16")
    Bbf = cluster_matrix(bf_b, cluster_zmq_object=cluster_zmq_obj, split_matrix=True, dim=1,
                         auto_set_up=[1, "save"], matrix_name="b_bf16")
    check("bfloat16 A @ B", bf_a.float() @ bf_b.float(),
          Abf.cluster_shard_operation(Bbf, False, False, True))  # judged with bfloat16's tolerance

    # ---- add (cluster_matrix_test_add.py): same shape, the seed's flags (False, True) ----
    addA = cluster_matrix(path("small_matrixA_float16.pt"), cluster_zmq_object=cluster_zmq_obj,
                          CPU_GPU_select_list=CPU_GPU_select_list, node_percentages=percentages,
                          back_end_select_list=backend_select_list, split_matrix=True, dim=0,
                          auto_set_up=[1, "save"])
    addB = cluster_matrix(path("small_matrixB_float16.pt"), cluster_zmq_object=cluster_zmq_obj,
                          CPU_GPU_select_list=CPU_GPU_select_list, node_percentages=percentages,
                          back_end_select_list=backend_select_list, split_matrix=True, dim=0,
                          auto_set_up=[1, "save"])
    check("add A + B", A3_float16 + B3_float16, addA.cluster_shard_operation(addB, False, True, True, "add"))
    check("sub by keywords", A3_float16 - B3_float16,
          addA.cluster_shard_operation(addB, False, True, send_back_result=True, operation="sub"))

    # ---- send back (cluster_send_back_test.py): kept on the cluster, fetched later ----
    kept = A32.cluster_shard_operation(B32, False, False, False)
    check("send_back after keeping", A_f32 @ B_f32,
          kept if torch.is_tensor(kept) else kept.send_back())

    # ---- single node (cluster_matrix_test_singleNode.py): B not split, send_back False ----
    if N == 1:
        single = cluster_zmq(["127.0.0.1"])
        SA = cluster_matrix(path("small_matrixA_float16.pt"), cluster_zmq_object=single, split_matrix=False,
                            auto_set_up=[1, "save"])
        SB = cluster_matrix(path("small_matrixB_float16.pt"), cluster_zmq_object=single, split_matrix=False,
                            auto_set_up=[1, "save"])
        check("single node A @ B.T", path("c_ref_float16.pt"),
              SA.cluster_shard_operation(SB, False, True, False))

    # ---- flash attention (flash_atten_test.py): [B, H, T, D] split by heads, GQA expanded,
    # the seed's keywords; the result in the seed's layout [H*T, D] ----
    B, T, n_q_heads, n_kv_heads, head_dim = 1, 16, 8, 2, 8
    Q = torch.randn(B, n_q_heads, T, head_dim)
    K = torch.randn(B, n_kv_heads, T, head_dim).repeat_interleave(n_q_heads // n_kv_heads, dim=1)
    V = torch.randn(B, n_kv_heads, T, head_dim).repeat_interleave(n_q_heads // n_kv_heads, dim=1)
    torch_out_2d = F.scaled_dot_product_attention(Q, K, V).squeeze(0).reshape(n_q_heads * T, head_dim)
    cluster_Q, cluster_K, cluster_V = (
        cluster_matrix(x, cluster_zmq_object=cluster_zmq_obj, CPU_GPU_select_list=CPU_GPU_select_list,
                       node_percentages=percentages, back_end_select_list=backend_select_list,
                       split_matrix=True, dim=1, auto_set_up=[1, "save"], matrix_name=name)
        for x, name in ((Q, "q_test"), (K, "k_test"), (V, "v_test")))
    scale = 1.0 / math.sqrt(head_dim)
    cluster_out_2d = cluster_Q.cluster_flash_attn(cluster_matrixK=cluster_K, cluster_matrixV=cluster_V,
                                                  TransposeQ=False, TransposeK=False, TransposeV=False,
                                                  send_back_result=True, operation="flash_attn_ext",
                                                  extra_param_value=scale)
    check("flash attention [H*T, D]", torch_out_2d, cluster_out_2d)
    kept_attention = cluster_Q.cluster_flash_attn(cluster_matrixK=cluster_K, cluster_matrixV=cluster_V,
                                                  extra_param_value=scale)  # the seed keeps it by default
    check("flash attention kept, sent back", torch_out_2d, kept_attention.send_back())
    causal_mask = (torch.arange(T)[None, :] > torch.arange(T)[:, None]).float() * -1e9
    torch_causal = F.scaled_dot_product_attention(Q, K, V, attn_mask=causal_mask)
    check("flash attention causal mask", torch_causal.squeeze(0).reshape(n_q_heads * T, head_dim),
          cluster_Q.cluster_flash_attn(cluster_matrixK=cluster_K, cluster_matrixV=cluster_V,
                                       send_back_result=True, extra_param_value=scale, mask=causal_mask))
    Q2, K2, V2 = torch.randn(T, 32), torch.randn(T, 32), torch.randn(T, 32)  # 2-D: one head
    q2, k2, v2 = (cluster_matrix(x, cluster_zmq_object=cluster_zmq_obj, split_matrix=False,
                                 auto_set_up=[1, "save"], matrix_name=name)
                  for x, name in ((Q2, "q_2d_test"), (K2, "k_2d_test"), (V2, "v_2d_test")))
    check("flash attention 2-D", torch.softmax(Q2 @ K2.T / math.sqrt(32), dim=-1) @ V2,
          q2.cluster_flash_attn(cluster_matrixK=k2, cluster_matrixV=v2, send_back_result=True,
                                extra_param_value=1 / math.sqrt(32)))

    # ---- a Llama-style layer loop (llama_cluster_transformer.py): weights saved once by path,
    # then loaded every step by the name the path gives; the activation kept off the disks ----
    hidden, layers = 64, 2
    q_proj_list = []
    for i in range(layers):
        torch.save(torch.randn(hidden, hidden) / 8, path(f"layers.{i}.q_proj.pt"))
        q_proj_list.append(path(f"layers.{i}.q_proj.pt"))
        cluster_matrix(q_proj_list[i], cluster_zmq_object=cluster_zmq_obj, split_matrix=True, dim=1,
                       auto_set_up=[1, "save"])
    weights = [torch.load(p) for p in q_proj_list]
    for p in q_proj_list:
        os.remove(p)  # the seed's driver loads by name: the nodes hold the shards
    x = torch.randn(3, hidden)
    for step in range(2):
        h = x
        for i in range(layers):
            x_norm = cluster_matrix(h, cluster_zmq_object=cluster_zmq_obj, split_matrix=False, dim=1,
                                    auto_set_up=[1, "save"], matrix_name="x_norm", save_bin_matrix=False)
            Q_weight = cluster_matrix(q_proj_list[i], cluster_zmq_object=cluster_zmq_obj, split_matrix=True,
                                      dim=1, auto_set_up=[1, "load"], save_bin_matrix=False)
            h = x_norm.cluster_shard_operation(Q_weight, False, False, True)
        want = x
        for w in weights:
            want = want @ w
        check(f"layer loop step {step}", want, h)

    failures = [label for label, ok in results if not ok]
    for label in failures:
        print("FAILED", label)
    print(f"seed-zmq: {len(results)} checks, {len(failures)} failures on {N} ranks", flush=True)
    sys.exit(1 if failures else 0)
