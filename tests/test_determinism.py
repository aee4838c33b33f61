"""fastff.set_deterministic: two seeded training runs give identical weights."""
import pytest
import torch

import fastff


def _train(seed):
    """Five Adam steps of a model whose training uses the RNG (init, dropout, region leak, data)."""
    fastff.set_deterministic(True, seed=seed)
    model = torch.nn.Sequential(fastff.FFF(8, 8, 2, 3, dropout=0.2, region_leak=0.2, usage="soft"),
                                fastff.NeuronTree(8, 8, 2), fastff.MoE(8, 4, 3, 2, k=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        x, y = torch.randn(32, 8), torch.randn(32, 4)
        loss = torch.nn.functional.mse_loss(model(x), y) + fastff.hardening_loss(model)
        loss = loss + fastff.load_balancing_loss(model, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def test_seeded_runs_are_identical():
    try:
        a, b, c = _train(7), _train(7), _train(8)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        fastff.set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)      # the seed matters: the check is not vacuous


@pytest.mark.parametrize("kwargs,message", [({"enabled": "yes"}, "enabled must be True or False"),
                                            ({"seed": -1}, "seed must be"), ({"seed": 1.5}, "seed must be")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastff.set_deterministic(**kwargs)
