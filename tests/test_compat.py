"""The seed API's checks (pure) and its single-node mode on a one-rank cluster in
this process. Multi-rank runs are in test_seed_readme.py and test_seed_mpi.py."""

import numpy as np
import pytest
from conftest import has_torch

import cmatrix as cm
from cmatrix.compat import matrix as compat
from cmatrix.compat import setup as compat_setup
from cmatrix.compat.values import as_matrix
from cmatrix.io import sinks

LISTS = (["127.0.0.1", "127.0.0.1"], [True, True], [0.5, 0.5], ["llama", "torch"])


def ranks(*hosts, addresses=None):
    return [{"rank": i, "host": h, "addresses": list((addresses or {}).get(h, ()))}
            for i, h in enumerate(hosts)]


def test_lists_are_checked_and_backends_mapped():
    ips, accel, shares, names = compat_setup.check_lists(*LISTS, size=2)
    assert names == ["ggml", "torch"] and shares == [0.5, 0.5] and accel == [True, True]


@pytest.mark.parametrize("change, fragment", [
    ({2: [0.5, 0.45]}, "sum to 0.95"),                  # the seed GUI's configs summed to 0.95 ...
    ({2: [0.1, 0.2]}, "sum to 0.3"),                    # ... and to 0.3
    ({1: [True]}, "CPU_GPU_select_list has 1"),
    ({0: ["127.0.0.1"] * 3, 1: [True] * 3, 2: [0.3, 0.3, 0.4], 3: ["numpy"] * 3}, "this job runs 2 MPI rank"),
    ({3: ["llama", "cuda-magic"]}, "unknown backend 'cuda-magic'"),
    ({1: [True, "yes"]}, "entry 1 must be True or False"),
    ({0: ["127.0.0.1", ""]}, "entry 1 must be a host name"),
    ({0: "127.0.0.1"}, "one entry per rank"),
])
def test_bad_lists_are_refused_with_the_seed_argument_named(change, fragment):
    lists = [change.get(i, v) for i, v in enumerate(LISTS)]
    with pytest.raises(cm.InputError, match=fragment):
        compat_setup.check_lists(*lists, size=2)


def test_hosts_match_by_name_address_or_loopback_on_one_host():
    table = ranks("nodeA", "nodeA", addresses={"nodeA": ("10.0.0.5", "fe80::1")})
    compat_setup.match_hosts(["nodeA", "10.0.0.5"], table)
    compat_setup.match_hosts(["127.0.0.1", "localhost"], table)
    compat_setup.match_hosts(["::ffff:10.0.0.5", "NODEA"], table)


def test_host_mismatch_lists_both_sides():
    table = ranks("nodeA", "nodeB", addresses={"nodeA": ("10.0.0.5",), "nodeB": ("10.0.0.6",)})
    with pytest.raises(cm.InputError) as info:
        compat_setup.match_hosts(["10.0.0.5", "10.0.0.7"], table)
    text = str(info.value)
    assert "entry 1 '10.0.0.7' is not rank 1's host 'nodeB'" in text
    assert "['10.0.0.5', '10.0.0.7']" in text and "rank 1: nodeB (10.0.0.6)" in text
    with pytest.raises(cm.InputError, match="loopback"):  # ambiguous once hosts differ
        compat_setup.match_hosts(["127.0.0.1", "10.0.0.6"], table)
    with pytest.raises(cm.InputError, match="entry 0 '10.0.0.6'"):  # hostfile order matters
        compat_setup.match_hosts(["10.0.0.6", "10.0.0.5"], table)


@pytest.mark.parametrize("setup", [[3, "save"], [1, "store"], "save", [1], None])
def test_auto_set_up(setup):
    if setup is None:
        assert compat._parse_setup(setup) == (1, "save")
        return
    with pytest.raises(cm.InputError, match="auto_set_up"):
        compat._parse_setup(setup)


def test_matrices_are_2d_after_dropping_leading_ones():
    assert as_matrix(np.ones((1, 1, 3, 4), np.float32)).shape == (3, 4)
    for shape in [(5,), (2, 3, 4), (0, 3)]:
        with pytest.raises(cm.InputError, match="reshape in torch first"):
            as_matrix(np.ones(shape, np.float32))
    name = compat._default_name("/data/layers.0 gate.pt")
    assert name.startswith("layers.0_gate-") and name != compat._default_name("/data/1/layers.0 gate.pt")
    assert compat._default_name("/data/w.h5#/a") != compat._default_name("/data/w.h5#/b")


# ---- single-node mode in this process (one rank, the numpy backend of cm.init()) ----------

def one(data, split=False, dim=0, setup=(1, "save"), name=None):
    return cm.cluster_matrix(matrix_file_path=data, node_IP_list=["127.0.0.1"], CPU_GPU_select_list=[True],
                             node_percentages=[1], back_end_select_list=["numpy"], split_matrix=split,
                             dim=dim, auto_set_up=list(setup), matrix_name=name)


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMATRIX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("CMATRIX_SHM_DIR", str(tmp_path_factory.mktemp("shm")))
        yield cm.init()


@pytest.mark.skipif(not has_torch(), reason="the seed API returns torch tensors")
def test_single_node_mode_with_and_without_send_back(cl):
    import torch

    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((16, 3)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    A, B = one(x), one(w, split=True, dim=1, setup=(1, "saveC"), name="single_w")
    y = A.cluster_shard_operation(B, True, False, True)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_allclose(y.numpy(), x.T @ w, rtol=1e-5, atol=1e-5)
    kept = A.cluster_shard_operation(B, True, False, False)
    assert isinstance(kept, cm.cluster_matrix) and kept.shape == (3, 8)
    np.testing.assert_allclose(kept.send_back().numpy(), x.T @ w, rtol=1e-5, atol=1e-5)
    again = one(None, split=True, dim=1, setup=(1, "loadC"), name="single_w")
    assert again.handle is B.handle
    with pytest.raises(cm.CacheError, match="was saved with split_matrix=True, dim=1"):
        one(None, split=True, dim=0, setup=(1, "loadC"), name="single_w")
    with pytest.raises(cm.CacheError, match="cache 'nothing': no saved copy"):
        one(None, split=True, setup=(1, "loadC"), name="nothing")  # not in RAM, not on disk


@pytest.mark.skipif(not has_torch(), reason="the seed API returns torch tensors")
def test_operation_errors(cl):
    w = np.ones((4, 4), np.float32)
    A, B = one(w), one(w, split=True, dim=1, setup=(1, "saveC"), name="ops_w")
    with pytest.raises(cm.InputError, match="op: expected one of"):
        A.cluster_shard_operation(B, False, False, True, "div")
    # single-node mode: B need not be split (on several nodes it must: seed_api_job.py)
    single = B.cluster_shard_operation(A, False, False, False)
    assert np.array_equal(single.numpy(), np.full((4, 4), 4.0, np.float32))
    with pytest.raises(cm.InputError, match="both matrices must be split"):
        A.cluster_shard_operation(B, False, False, True, "add")
    with pytest.raises(cm.InputError, match="matrix_name"):
        one(w, split=True, dim=1, setup=(1, "load"))
    unnamed = one(w, split=True, dim=1, setup=(1, "save"))  # a tensor without a name: sent, not cached
    assert not unnamed.handle.cached
    kept = one(w, setup=(2, "saveC"), name="g")  # grid operands stay on the driver, under their name
    assert one(None, setup=(2, "loadC"), name="g")._host is kept._host
    with pytest.raises(cm.CacheError, match="no grid matrix named 'h'"):
        one(None, setup=(2, "load"), name="h")
    with pytest.raises(cm.InputError, match="already runs back_end_select_list"):
        cm.cluster_matrix(matrix_file_path=w, node_IP_list=["127.0.0.1"], CPU_GPU_select_list=[True],
                          node_percentages=[1], back_end_select_list=["torch"])


@pytest.mark.skipif(not has_torch(), reason="the seed API returns torch tensors")
def test_disk_cache_save_then_load_and_shm_result(cl, tmp_path):
    import torch

    w = np.arange(32, dtype=np.float32).reshape(4, 8)
    path = tmp_path / "gate_w.pt"
    torch.save(torch.from_numpy(w), path)
    saved = one(str(path), split=True, dim=1, setup=(1, "save"))
    assert saved.matrix_name.startswith("gate_w-") and saved.handle.cached
    loaded = one(str(path), split=True, dim=1, setup=(1, "load"))
    x = np.ones((4, 2), np.float32)
    result = one(x).cluster_shard_operation(loaded, True, False, True, shm_name="seed_y")
    np.testing.assert_allclose(result.numpy(), x.T @ w)
    written = cm.convert_bin_matrix_to_pt(str(sinks.shm_dir() / "seed_y.bin"))
    np.testing.assert_allclose(written.numpy(), x.T @ w)
    torch.save(torch.from_numpy(w + 1), path)  # the file changed: the cache is stale now
    with pytest.raises(cm.CacheError, match="weight"):
        one(str(path), split=True, dim=1, setup=(1, "load"))


@pytest.mark.skipif(not has_torch(), reason="the seed API returns torch tensors")
def test_operation_option_errors(cl):
    w = np.ones((4, 4), np.float32)
    A, B = one(w), one(w, split=True, dim=1, setup=(1, "saveC"), name="opt_w")
    G, H = one(w, setup=(2, "save")), one(w, setup=(2, "save"))
    with pytest.raises(cm.InputError, match="B: expected a cluster_matrix"):
        A.cluster_shard_operation(w, False, False, True)
    with pytest.raises(cm.InputError, match="shm_name"):
        A.cluster_shard_operation(B, False, False, False, shm_name="y")
    with pytest.raises(cm.InputError, match="grid mode results are assembled"):
        G.cluster_shard_operation(H, False, False, False)
    with pytest.raises(cm.InputError, match="add has no inner dimension"):
        G.cluster_shard_operation(H, False, False, True, "add", inner=True)
    np.testing.assert_allclose(G.cluster_shard_operation(H, False, False, True).numpy(), w @ w)


# ---- the seed's later call form and its optional arguments (issue 17) -----------------------

@pytest.mark.parametrize("args, kwargs", [
    ((["h"], [True], [1], ["numpy"], True, 1), {}),                 # every argument by position
    ((["h"], [True], [1], ["numpy"], True), {"dim": 1}),            # dim by keyword
    ((["h"],), {"CPU_GPU_select_list": [True], "node_percentages": [1], "back_end_select_list": ["numpy"],
                "split_matrix": True, "dim": 1}),                   # only the IP list by position
])
def test_the_earlier_positional_form_is_shifted_back(args, kwargs):
    names = ("cluster_zmq_object", "node_IP_list", "CPU_GPU_select_list", "node_percentages",
             "back_end_select_list", "split_matrix", "dim")
    given = dict.fromkeys(names)
    given.update(zip(names, args, strict=False))
    given.update(kwargs)
    assert compat._old_positional(*given.values()) == (None, ["h"], [True], [1], ["numpy"], True, 1)


def test_cluster_zmq_defaults_are_the_seeds():
    assert compat_setup.even_percentages(3) == [0.34, 0.33, 0.33]
    assert compat_setup.even_percentages(4) == [0.25] * 4
    assert abs(sum(compat_setup.even_percentages(7)) - 1) < 1e-9


@pytest.mark.skipif(not has_torch(), reason="the seed API returns torch tensors")
def test_both_call_forms_and_the_seeds_keywords(cl, tmp_path):
    import torch

    w, x = torch.randn(6, 4), torch.randn(3, 6)
    z = cm.cluster_zmq(["127.0.0.1"])
    assert z.default_back_end_select_list == ["llama"] and z.default_CPU_GPU_select_list == [True]
    lists = (["127.0.0.1"], [True], [1], ["numpy"])  # what cl was started with
    same = dict(CPU_GPU_select_list=[True], node_percentages=[1], back_end_select_list=["numpy"])
    X = cm.cluster_matrix(x, z, split_matrix=False, **same)  # the lists next to the object
    W_old = cm.cluster_matrix(w, *lists, True, 1)  # the earlier form, all positional
    assert W_old.split_matrix and W_old.dim == 1 and W_old.node_IP_list == ["127.0.0.1"]
    y = X.cluster_shard_operation(W_old, send_back_result=True, operation="mul")
    torch.testing.assert_close(y, x @ w)
    with pytest.raises(cm.InputError, match="matrix_labeling"):
        cm.cluster_matrix(w, z, matrix_labeling="c", **same)
    with pytest.raises(cm.InputError, match="cluster_zmq_object: expected cluster_zmq"):
        cm.cluster_matrix(w, cluster_zmq_object="127.0.0.1")
    with pytest.raises(cm.InputError, match="pass cluster_zmq_object"):
        cm.cluster_matrix(w)
    assert cm.check_combined_result_values(x @ w, y) is True
    assert cm.check_combined_result_values(x @ w, y + 1) is False
    from cluster_matrix_v1 import check_combined_result_values, cluster_zmq

    assert cluster_zmq is cm.cluster_zmq and check_combined_result_values is cm.check_combined_result_values


@pytest.mark.skipif(not has_torch(), reason="the seed API returns torch tensors")
def test_convert_bin_matrix_to_pt_folds_to_2d_as_the_seed(cl, tmp_path):
    import torch

    from cmatrix.io.binfmt import write_bin

    write_bin(tmp_path / "t.bin", np.arange(24, dtype=np.float32).reshape(2, 3, 4), "float32")
    m = one(np.ones((2, 2), np.float32))
    assert tuple(m.convert_bin_matrix_to_pt(tmp_path / "t.bin").shape) == (6, 4)
    assert tuple(m.convert_bin_matrix_to_pt(tmp_path / "t.bin", force_2d=False).shape) == (2, 3, 4)
    assert torch.equal(m.convert_bin_matrix_to_pt(tmp_path / "t.bin").flatten(), torch.arange(24.0))


@pytest.mark.skipif(not has_torch(), reason="the seed API returns torch tensors")
def test_heads_layout_and_refusals(cl):
    import torch

    q = torch.randn(1, 4, 5, 8)  # [B, H, T, D]
    Q = cm.cluster_matrix(q, node_IP_list=["127.0.0.1"], split_matrix=True, dim=1, matrix_name="hq",
                          CPU_GPU_select_list=[True], node_percentages=[1], back_end_select_list=["numpy"])
    assert Q.head_dim == 8 and Q.shape == (5, 32)
    assert torch.equal(Q.send_back(), q.squeeze(0).reshape(20, 8))  # the seed's [H*T, D]
    with pytest.raises(cm.InputError, match="split by heads: dim=1"):
        one(q, split=True, dim=2)
    with pytest.raises(cm.InputError, match="batch 1"):
        one(torch.randn(2, 4, 5, 8))
    with pytest.raises(cm.InputError, match="TransposeQ/K/V"):
        Q.cluster_flash_attn(cluster_matrixK=Q, cluster_matrixV=Q, TransposeK=True)
    with pytest.raises(cm.InputError, match="operation: 'flash_attn_ext'"):
        Q.cluster_flash_attn(cluster_matrixK=Q, cluster_matrixV=Q, operation="soft_max")
    with pytest.raises(cm.InputError, match="node_IP_list: empty"):
        cm.cluster_zmq([])
