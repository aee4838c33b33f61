"""Auxiliary losses: load balancing (Switch form) and hardening (node entropy)."""
import math

import pytest
import torch

import fastff


def quadrant_fff(scale: float = 1e3) -> fastff.FFF:
    """Depth-2 FFF on 2-D inputs: the root splits on x0, both children split on x1."""
    f = fastff.FFF(2, 1, 2, 1).double()
    with torch.no_grad():
        f.node_w.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]) * scale)
        f.node_b.zero_()
    return f


def corners(counts):
    """Rows at the four quadrant corners, ``counts[i]`` rows for leaf i (leaf order: --, -+, +-, ++)."""
    pts = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    return torch.cat([pts[i].expand(c, 2) for i, c in enumerate(counts)])


@pytest.mark.parametrize("alpha", [0.01, 1.0, 3.0])
def test_load_balancing_is_alpha_for_uniform_routing(alpha):
    f = quadrant_fff()
    f.train()(corners([5, 5, 5, 5]))
    torch.testing.assert_close(f.aux["route_fraction"], torch.full((4,), 0.25, dtype=torch.float64))
    assert fastff.load_balancing_loss(f, alpha).item() == pytest.approx(alpha, rel=1e-12)


def test_load_balancing_grows_with_imbalance():
    losses = []
    for counts in ([5, 5, 5, 5], [8, 4, 4, 4], [14, 2, 2, 2], [20, 0, 0, 0]):
        f = quadrant_fff()
        f.train()(corners(counts))
        losses.append(fastff.load_balancing_loss(f, 1.0).item())
    assert all(a < b for a, b in zip(losses, losses[1:]))
    assert losses[-1] == pytest.approx(4.0)  # everything in one of N=4 leaves: alpha * N


def test_load_balancing_gradient_pushes_towards_balance():
    f = quadrant_fff(scale=1.0)
    f.train()(corners([14, 2, 2, 2]))
    fastff.load_balancing_loss(f, 1.0).backward()
    # raising the root bias sends mass right, away from the overloaded leaf 0: loss must decrease
    assert f.node_b.grad[0] < 0


def test_moe_load_balancing_uniform_and_skewed():
    torch.manual_seed(0)
    m = fastff.MoE(4, 2, experts=4, expert_width=3).double()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.bias.zero_()
    m.train()(torch.randn(16, 4, dtype=torch.float64))
    # uniform router: P_i = 1/4 exactly, so the loss is alpha whatever the tie-broken top-1
    assert fastff.load_balancing_loss(m, 0.5).item() == pytest.approx(0.5)


def test_hardening_loss_modes():
    f = quadrant_fff(scale=0.0)  # every decision p = 0.5: maximal entropy log 2 at every node
    f.train()(corners([3, 3, 3, 3]))
    assert fastff.hardening_loss(f, mode="mean").item() == pytest.approx(3 * math.log(2))
    # reach-weighted: the root has reach 1, each child reach 0.5
    assert fastff.hardening_loss(f, mode="reach").item() == pytest.approx(2 * math.log(2))
    assert fastff.hardening_loss(f).item() == pytest.approx(2 * math.log(2))  # default is "reach"


def test_losses_sum_over_layers_and_need_a_training_forward():
    model = torch.nn.Sequential(quadrant_fff(), torch.nn.Linear(1, 2).double())
    with pytest.raises(RuntimeError, match="training-mode forward"):
        fastff.hardening_loss(model)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        fastff.load_balancing_loss(torch.nn.Linear(2, 2))
    two = torch.nn.ModuleList([quadrant_fff(), quadrant_fff()])
    for layer in two:
        layer.train()(corners([5, 5, 5, 5]))
    assert fastff.load_balancing_loss(two, 0.1).item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="mode"):
        fastff.hardening_loss(two, mode="max")
    with pytest.raises(ValueError, match="alpha"):
        fastff.load_balancing_loss(two, -1.0)


@pytest.mark.parametrize("make", [lambda: fastff.FFF(4, 3, 3, 2), lambda: fastff.FFF(4, 3, 3, 2, train_mode="hard_path"),
                                  lambda: fastff.MoE(4, 3, 4, 2)])
def test_losses_after_an_empty_batch_are_zero(make):
    """An empty training batch records zeros, not NaN (soft and hard_path FFF agree)."""
    layer = make().train()
    layer(torch.randn(0, 4))
    assert fastff.load_balancing_loss(layer, 0.5).item() == 0.0
    if isinstance(layer, fastff.FFF):
        for mode in ("reach", "mean"):
            assert fastff.hardening_loss(layer, mode=mode).item() == 0.0
