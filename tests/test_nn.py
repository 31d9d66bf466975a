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
