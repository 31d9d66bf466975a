"""cm.nn: ClusterLinear and shard_linears on a one-rank cluster in this process.
Multi-rank runs against transformers models are in test_nn_mpi.py."""

import pytest

torch = pytest.importorskip("torch")

import cmatrix as cm  # noqa: E402


@pytest.fixture(scope="module")
def cl():
    return cm.init()


def test_cluster_linear_matches_nn_linear(cl):
    torch.manual_seed(0)
    ref = torch.nn.Linear(24, 10)
    layer = cm.nn.ClusterLinear(cl, ref.weight, ref.bias)
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (2, 3, 10) and layer.sharded.axis == 0
    assert "out_features=10" in repr(layer)
    plain = cm.nn.ClusterLinear(cl, ref.weight)  # no bias
    torch.testing.assert_close(plain(x), x @ ref.weight.detach().T, rtol=1e-5, atol=1e-5)


def test_quantised_linear_within_q8_tolerance(cl):
    torch.manual_seed(1)
    ref = torch.nn.Linear(64, 16, bias=False)
    layer = cm.nn.ClusterLinear(cl, ref.weight, quant="q8_0")
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = ref(x)
    err = (layer(x) - want).abs().max().item()
    assert 0 < err < 1e-2 * want.abs().max().item()  # rounded to 8-bit blocks: close, not equal


def test_bad_input_is_refused(cl):
    with pytest.raises(cm.InputError, match="2-D"):
        cm.nn.ClusterLinear(cl, torch.ones(3))
    with pytest.raises(cm.InputError, match="bias"):
        cm.nn.ClusterLinear(cl, torch.ones(3, 4), torch.ones(4))
    layer = cm.nn.ClusterLinear(cl, torch.ones(3, 4))
    with pytest.raises(cm.InputError, match="in_features 4"):
        layer(torch.ones(2, 5))
    with pytest.raises(cm.InputError, match="min_features"):
        cm.nn.shard_linears(torch.nn.Linear(2, 2), cl, min_features=-1)


def test_shard_linears_swaps_in_place_and_keeps_outputs(cl):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8),
                                torch.nn.Sequential(torch.nn.Linear(8, 4)))
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = model(x)
        swapped = cm.nn.shard_linears(model, cl, min_features=8)
        got = model(x)
    assert swapped == ["0", "2"]  # the 8 -> 4 layer is below min_features
    assert isinstance(model[0], cm.nn.ClusterLinear) and isinstance(model[3][0], torch.nn.Linear)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layers_read_directly_are_left_alone_and_weight_reads_work(cl):
    torch.manual_seed(3)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = layer(x)
        swapped = cm.nn.shard_linears(layer, cl)
        got = layer(x)
    assert swapped == ["linear1", "linear2"]  # out_proj is read as a weight by MultiheadAttention
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.linear1.weight.shape == (32, 16) and layer.linear1.weight.device.type == "meta"


def test_a_module_under_two_names_is_swapped_once_under_both(cl):
    shared = torch.nn.Linear(8, 8)
    model = torch.nn.Module()
    model.a, model.b = shared, shared
    assert cm.nn.shard_linears(model, cl) == ["a", "b"]
    assert model.a is model.b and isinstance(model.a, cm.nn.ClusterLinear)


def test_nothing_is_swapped_when_one_layer_cannot_be(cl):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 48), torch.nn.Linear(48, 8))
    with pytest.raises(cm.InputError, match="2: in_features"):
        cm.nn.shard_linears(model, cl, quant="q8_0")  # 48 is not a multiple of 32
    assert all(type(m) is torch.nn.Linear for m in model)
    with torch.device("meta"):
        ghost = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(cm.InputError, match="meta device"):
        cm.nn.shard_linears(ghost, cl)


def test_empty_input_gives_an_empty_output(cl):
    layer = cm.nn.ClusterLinear(cl, torch.ones(3, 4))
    assert layer(torch.ones(0, 4)).shape == (0, 3)


def test_t5_reads_its_weight_dtype_and_still_matches(cl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0)
    model = transformers.T5Model(config).eval()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
        assert len(cm.nn.shard_linears(model, cl)) > 0
        got = model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
