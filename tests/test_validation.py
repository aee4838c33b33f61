"""Every documented bad-input case of the core layers raises a clear error."""
import pytest
import torch

import fastff

BAD_CONFIGS = [
    (lambda: fastff.FFF(4, 2, -1, 3), ValueError, "depth"),
    (lambda: fastff.FFF(4, 2, 2.5, 3), ValueError, "depth"),
    (lambda: fastff.FFF(0, 2, 2, 3), ValueError, "in_features"),
    (lambda: fastff.FFF(4, 0, 2, 3), ValueError, "out_features"),
    (lambda: fastff.FFF(4, 2, 2, 0), ValueError, "leaf_width"),
    (lambda: fastff.FFF(4, 2, 2, 3, dropout=1.5), ValueError, r"dropout must be in \[0, 1"),
    (lambda: fastff.FFF(4, 2, 2, 3, dropout=-0.1), ValueError, "dropout"),
    (lambda: fastff.FFF(4, 2, 2, 3, region_leak=2), ValueError, "region_leak"),
    (lambda: fastff.FFF(4, 2, 2, 3, region_leak=float("nan")), ValueError, "region_leak"),
    (lambda: fastff.FFF(4, 2, 2, 3, activation="swish2"), ValueError, "activation must be one of"),
    (lambda: fastff.FFF(4, 2, 2, 3, master_leaf="always"), ValueError, "master_leaf must be one of"),
    (lambda: fastff.FFF(4, 2, 2, 3, usage="count"), ValueError, "usage must be one of"),
    (lambda: fastff.FFF(4, 2, 2, 3, master_leaf="scalar", master_width=0), ValueError, "master_width"),
    (lambda: fastff.FFF(4, 2, 2, 3, backend="gpu"), ValueError, "backend must be one of"),
    (lambda: fastff.NeuronTree(4, 2, -2), ValueError, "depth"),
    (lambda: fastff.NeuronTree(4, 2, 3, trees=0), ValueError, "trees"),
    (lambda: fastff.NeuronTree(4, 2, 3, activation="bad"), ValueError, "activation"),
    (lambda: fastff.MoE(4, 2, 0, 3), ValueError, "experts"),
    (lambda: fastff.MoE(4, 2, 4, 3, k=5), ValueError, r"k must be in \[1, 4\]"),
    (lambda: fastff.DenseFF(4, 2, 0), ValueError, "hidden"),
    (lambda: fastff.set_backend("fast"), ValueError, "backend must be one of"),
    (lambda: fastff.FFF(13, 7, 30, 2), ValueError, r"FFF\(depth=30, leaf_width=2\) would have .* bytes"),
    (lambda: fastff.NeuronTree(13, 7, 30), ValueError, r"NeuronTree\(depth=30, trees=1\) would have .* bytes"),
]


@pytest.mark.parametrize("make,error,message", BAD_CONFIGS)
def test_bad_config_raises(make, error, message):
    with pytest.raises(error, match=message):
        make()


LAYERS = [lambda: fastff.FFF(4, 2, 2, 3), lambda: fastff.NeuronTree(4, 2, 2),
          lambda: fastff.MoE(4, 2, 3, 2), lambda: fastff.DenseFF(4, 2, 5)]


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("train", [True, False])
def test_bad_inputs_raise(make, train):
    layer = make().train(train)
    with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 4\), got \(3, 5\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\), got \(\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        layer(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype torch.float32 but got input of dtype torch.float64"):
        layer(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        layer([[0.0] * 4])


@pytest.mark.parametrize("make_a,make_b,tensor", [
    (lambda: fastff.FFF(4, 2, 2, 3), lambda: fastff.FFF(4, 2, 3, 3), "node_w"),
    (lambda: fastff.FFF(4, 2, 2, 3), lambda: fastff.FFF(4, 2, 2, 5), "w1"),
    (lambda: fastff.NeuronTree(4, 2, 2), lambda: fastff.NeuronTree(4, 2, 2, trees=2), "w_in"),
    (lambda: fastff.MoE(4, 2, 3, 2), lambda: fastff.MoE(4, 2, 3, 4), "w1"),
])
def test_loading_another_shape_names_the_tensor_and_shapes(make_a, make_b, tensor):
    a, b = make_a(), make_b()
    with pytest.raises(ValueError, match=rf"'{tensor}': checkpoint \(\d.*\) vs layer \(\d.*\)"):
        b.load_state_dict(a.state_dict())


def test_nested_load_names_the_prefixed_tensor():
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), fastff.FFF(4, 2, 1, 3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 4), fastff.FFF(4, 2, 2, 3))
    with pytest.raises(ValueError, match=r"'1\.node_w': checkpoint \(1, 4\) vs layer \(3, 4\)"):
        b.load_state_dict(a.state_dict())
