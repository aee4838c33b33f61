"""Conditional training: NeuronTree sparse autograd, FFF hard_path, local optimisers."""
import copy
from contextlib import ExitStack
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import fastff
from fastff import kernels
from fastff.functional import hard_path_from_logits
from fastff.kernels import cpu, reference as R
from fastff.training import LocalAdam, LocalSGD, load_balancing_loss
from fastff.apps.train_bench import train_step_rows

F64 = torch.float64
LEAD = [(), (3,), (2, 3)]
ACTS = ["gelu", "relu", "silu", "tanh", "gelu_tanh", "sigmoid", "identity"]


def grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g, allow_unused=True, materialize_grads=True)


def assert_all_close(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


def nt_params(nt):
    return [nt.w_in, nt.b_in, nt.w_out] + ([] if nt.b_out is None else [nt.b_out])


# (SUBTREE_BYTES, TILE_BYTES) of fastff.kernels.cpu: the default, rows regrouped on the deepest
# level in tiles of 4, and weight gradients of every level from per-chunk partial sums
# (TILE_BYTES 1) or from the top levels' partials and per-subtree sums (TILE_BYTES 100).
GROUPING = [(1 << 19, 3 << 18), (0, 1), (0, 100)]


def grouping(subtree_bytes, tile_bytes):
    stack = ExitStack()
    stack.enter_context(mock.patch.object(cpu, "SUBTREE_BYTES", subtree_bytes))
    stack.enter_context(mock.patch.object(cpu, "TILE_BYTES", tile_bytes))
    return stack


@given(depth=st.integers(0, 8), trees=st.integers(1, 4), lead=st.sampled_from(LEAD), rows=st.integers(1, 30),
       act=st.sampled_from(ACTS), bias=st.booleans(), paths=st.sampled_from(GROUPING), seed=st.integers(0, 2**16))
def test_neuron_tree_conditional_grads_equal_masked_dense(depth, trees, lead, rows, act, bias, paths, seed):
    torch.manual_seed(seed)
    nt = fastff.NeuronTree(5, 4, depth, trees, activation=act, bias=bias).to(F64).train()
    x = torch.randn(*lead, rows, 5, dtype=F64, requires_grad=True)
    with grouping(*paths):
        y = nt(x)                                                      # numba conditional path
    g = torch.randn_like(y)
    params = nt_params(nt)
    y_ref = R.neuron_tree_masked_dense(x.reshape(-1, 5), nt.w_in, nt.b_in, nt.w_out, nt.b_out, act)
    torch.testing.assert_close(y.reshape(-1, 4), y_ref, rtol=1e-9, atol=1e-10)
    expected = grads(y_ref, [x] + params, g.reshape(-1, 4))
    with grouping(*paths):
        assert_all_close(grads(y, [x] + params, g), expected)
    y_t, _ = kernels.resolve("torch").neuron_tree_paths(x.reshape(-1, 5), nt.w_in, nt.b_in, nt.w_out, nt.b_out, act)
    assert_all_close(grads(y_t, [x] + params, g.reshape(-1, 4)), expected)


def test_neuron_tree_weight_grads_only_in_visited_rows():
    torch.manual_seed(0)
    nt = fastff.NeuronTree(6, 3, 6, 2).train()
    x = torch.randn(5, 6)
    nt(x).sum().backward()
    visited = torch.zeros(2, 127, dtype=torch.bool)
    visited.scatter_(1, R.neuron_tree_visits(x, nt.w_in, nt.b_in).permute(1, 0, 2).reshape(2, -1), True)
    assert (nt.w_in.grad.abs().sum(-1) > 0).eq(visited).all()
    assert int((~visited).sum()) >= 2 * (127 - 5 * 7)                 # 5 rows visit at most 5 · 7 neurons per tree
    assert (nt.w_out.grad[~visited] == 0).all() and (nt.b_in.grad[~visited] == 0).all()


def fff_params(f):
    return [f.node_w, f.node_b, f.w1, f.b1, f.w2, f.b2]


@given(depth=st.integers(0, 6), leaf=st.integers(1, 5), lead=st.sampled_from(LEAD), rows=st.integers(1, 30),
       act=st.sampled_from(ACTS), backend=st.sampled_from(["cpu", "torch"]), paths=st.sampled_from(GROUPING),
       seed=st.integers(0, 2**16))
def test_hard_path_equals_all_leaves_masked_reference(depth, leaf, lead, rows, act, backend, paths, seed):
    torch.manual_seed(seed)
    f = fastff.FFF(5, 3, depth, leaf, activation=act, train_mode="hard_path").to(F64).train()
    x = torch.randn(*lead, rows, 5, dtype=F64, requires_grad=True)
    x2 = x.reshape(-1, 5)
    if backend == "cpu":
        with grouping(*paths):
            y = f(x).reshape(-1, 3)
    else:
        y = kernels.fff_hard_path(x2, *fff_params(f), act, backend="torch")[0]
    y_ref = R.fff_hard_path(x2, *fff_params(f), act)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(y)
    with grouping(*paths):
        assert_all_close(grads(y, [x] + fff_params(f), g), grads(y_ref, [x] + fff_params(f), g))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_hard_path_region_leak_and_hardened(backend):
    torch.manual_seed(1)
    f = fastff.FFF(4, 2, 4, 3).to(F64)
    x = torch.randn(20, 4, dtype=F64)
    flip = torch.ones(20, 4, dtype=torch.bool)                         # every decision swapped
    y, q, *_ = kernels.fff_hard_path(x, *fff_params(f), "relu", flip=flip, backend=backend)
    p = torch.sigmoid(x @ f.node_w.T + f.node_b)
    torch.testing.assert_close(y, R.fff_hard_path(x, *fff_params(f), "relu", p=1 - p))
    assert (q >= 0.5).all()                                            # the more probable child is taken
    y_h, q_h, *_ = kernels.fff_hard_path(x, *fff_params(f), "relu", hardened=True, backend=backend)
    torch.testing.assert_close(y_h, R.fff_hard_path(x, *fff_params(f), "relu", p=(p >= 0.5).to(F64)))
    assert (q_h == 1).all()
    # the layer draws one Bernoulli(region_leak) flip per row and level and routes with it
    leaky = fastff.FFF(4, 2, 6, 2, train_mode="hard_path", region_leak=0.3).to(F64).train()
    xs = torch.randn(300, 4, dtype=F64)
    torch.manual_seed(7)
    y_leaky = leaky(xs)
    torch.manual_seed(7)
    flip = torch.rand(300, 6) < 0.3
    torch.testing.assert_close(y_leaky, kernels.fff_hard_path(xs, *fff_params(leaky), "relu", flip=flip, backend=backend)[0])
    no_leak = kernels.fff_hard_path(xs, *fff_params(leaky), "relu", backend=backend)[0]
    assert 0.6 < (y_leaky != no_leak).any(1).double().mean() < 0.98          # 1 - 0.7**6 = 0.88


def test_hard_path_dropout_numba_equals_torch():
    torch.manual_seed(8)
    f = fastff.FFF(5, 3, 3, 4).to(F64)
    x = torch.randn(30, 5, dtype=F64, requires_grad=True)
    outs = []
    for backend in ("cpu", "torch"):
        torch.manual_seed(9)                                           # same dropout mask
        y = kernels.fff_hard_path(x, *fff_params(f), "gelu", dropout=0.5, backend=backend)[0]
        outs.append((y, grads(y, [x] + fff_params(f), torch.ones_like(y))))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert_all_close(outs[0][1], outs[1][1])


def test_hard_path_aux_usage_and_load_balancing():
    torch.manual_seed(2)
    f = fastff.FFF(6, 2, 3, 4, train_mode="hard_path", usage="hard").train()
    x = torch.randn(50, 6)
    f(x)
    aux = f.aux
    assert aux["route_fraction"].sum().item() == pytest.approx(1.0)
    assert f.leaf_usage.sum() == 50 and f.node_usage[0] == 50
    assert f.node_usage[1:3].sum() == 50 and f.node_usage[3:].sum() == 50
    assert (aux["node_entropy"] >= 0).all() and aux["node_entropy"][0] > 0
    assert (aux["reach_entropy"] <= aux["node_entropy"] + 1e-7).all()
    lb = load_balancing_loss(f, 0.5)
    lb.backward()
    assert f.node_w.grad.abs().sum() > 0                               # routing learns to balance
    soft = fastff.FFF(6, 2, 3, 4, train_mode="hard_path", usage="soft").train()
    soft(x)
    torch.testing.assert_close(soft.leaf_usage.sum(), soft.aux["route_prob"].sum() * 50)


def test_hard_path_master_leaf_and_validation():
    f = fastff.FFF(4, 3, 3, 2, master_leaf="token", train_mode="hard_path").train()
    f(torch.randn(7, 4)).sum().backward()
    assert f.master.fc1.weight.grad is not None and f.w1.grad is not None
    with pytest.raises(ValueError, match="train_mode"):
        fastff.FFF(4, 3, 3, 2, train_mode="hard")
    with pytest.raises(ValueError, match="usage"):
        fastff.NeuronTree(4, 3, 2, usage="soft")


def sgd_steps(params, loss_fn, steps=3):
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


@pytest.mark.parametrize("kind", ["neuron_tree", "hard_path"])
def test_optimizer_steps_match_reference(kind):
    torch.manual_seed(3)
    x, t = torch.randn(32, 6, dtype=F64), torch.randn(32, 4, dtype=F64)
    if kind == "neuron_tree":
        fast = fastff.NeuronTree(6, 4, 4, 2).to(F64).train()
        ref_fn = lambda m: R.neuron_tree_masked_dense(x, m.w_in, m.b_in, m.w_out, m.b_out, "gelu")  # noqa: E731
    else:
        fast = fastff.FFF(6, 4, 4, 3, train_mode="hard_path").to(F64).train()
        ref_fn = lambda m: R.fff_hard_path(x, *fff_params(m), "relu")  # noqa: E731
    ref = copy.deepcopy(fast)
    sgd_steps(list(fast.parameters()), lambda: ((fast(x) - t) ** 2).mean())
    sgd_steps(list(ref.parameters()), lambda: ((ref_fn(ref) - t) ** 2).mean())
    for a, b in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("make", [lambda: fastff.NeuronTree(8, 2, 5, 2),
                                  lambda: fastff.FFF(8, 2, 4, 8, train_mode="hard_path"),
                                  lambda: fastff.FFF(8, 2, 4, 8, train_mode="hard_path", usage="hard")])
def test_training_lowers_loss(make):
    torch.manual_seed(4)
    model = make().train()
    x = torch.randn(256, 8)
    t = torch.tanh(x[:, :2] * 2)
    opt = (LocalAdam(model, lr=1e-2, local_batch_size=16) if getattr(model, "usage", None)
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    losses = []
    for _ in range(40):
        loss = ((model(x) - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def local_setup(usage="hard"):
    torch.manual_seed(5)
    f = fastff.FFF(3, 2, 1, 2, usage=usage, train_mode="hard_path").to(F64).train()
    x = torch.randn(6, 3, dtype=F64)
    return f, x


def one_step(f, opt, x):
    opt.zero_grad()
    f(x).sum().backward()
    grads_ = {n: p.grad.clone() for n, p in f.named_parameters()}
    opt.step()
    return grads_


@pytest.mark.parametrize("fused", [True, False])
def test_local_sgd_waits_for_local_batch_then_rescales(fused):
    f, x = local_setup()
    counts = torch.bincount(hard_path_from_logits(x @ f.node_w.T + f.node_b, f.depth).leaf, minlength=2).to(F64)
    busy = int(counts.argmax())
    assert counts[busy] > counts[1 - busy]
    lbs = 3 * float(counts[busy]) - 0.5            # only the busier leaf reaches it, on step 3
    opt = LocalSGD(f, lr=0.1, local_batch_size=lbs, fused=fused)
    start = copy.deepcopy(f.state_dict())
    acc = {n: torch.zeros_like(p) for n, p in f.named_parameters()}
    for step in range(3):
        g = one_step(f, opt, x)
        for n in acc:
            acc[n] += g[n]
        if step < 2:                                # no leaf reached lbs yet: leaves did not move
            for n in ("w1", "b1", "w2", "b2"):
                torch.testing.assert_close(getattr(f, n), start[n])
    for n in ("w1", "b1", "w2", "b2"):
        expected = start[n][busy] - 0.1 * acc[n][busy] * lbs / (3 * counts[busy])
        torch.testing.assert_close(getattr(f, n)[busy], expected)
        torch.testing.assert_close(getattr(f, n)[1 - busy], start[n][1 - busy])   # still waiting
    assert (opt.state[f.w1]["acc"][busy] == 0).all() and (opt.state[f.w1]["acc"][1 - busy] != 0).any()


@pytest.mark.parametrize("fused", [True, False])
def test_local_adam_steps_a_block_when_ready_with_its_own_moments(fused):
    f, x = local_setup(usage="soft")
    opt = LocalAdam(f, lr=0.01, local_batch_size=12, fused=fused)   # root: 6 rows (reach 1) per step
    start = copy.deepcopy(f.state_dict())
    g = one_step(f, opt, x)
    for n, p in f.named_parameters():
        torch.testing.assert_close(p, start[n])        # nothing reached 12 yet
    g2 = one_step(f, opt, x)
    acc = g["node_w"] + g2["node_w"]                   # rescale 12 / 12 = 1
    torch.testing.assert_close(f.node_w, start["node_w"] - 0.01 * acc / (acc.abs() + 1e-8))
    assert opt.state[f.node_w]["steps"].tolist() == [1.0]
    assert f.leaf_usage.max() < 12                     # gates < 1: leaves keep accumulating
    torch.testing.assert_close(f.w1, start["w1"])


@given(lbs=st.floats(1, 200), steps=st.integers(1, 6), usage=st.sampled_from(["soft", "hard"]),
       adam=st.booleans(), seed=st.integers(0, 2**16))
def test_local_fused_step_equals_torch_path(lbs, steps, usage, adam, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(fastff.FFF(5, 4, 3, 3, usage=usage, train_mode="hard_path"),
                                fastff.NeuronTree(4, 2, 2, 2, usage="hard")).to(F64)
    twin = copy.deepcopy(model)
    make = (lambda m, f: LocalAdam(m, lr=0.01, local_batch_size=lbs, fused=f)) if adam else \
        (lambda m, f: LocalSGD(m, lr=0.1, local_batch_size=lbs, fused=f))
    opts = [make(model, True), make(twin, False)]
    x, t = torch.randn(40, 5, dtype=F64), torch.randn(40, 2, dtype=F64)
    for _ in range(steps):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            ((m(x) - t) ** 2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("adam", [False, True])
def test_local_fused_step_keeps_nan_and_inf(adam):
    """A NaN / inf gradient reaching the fused numba step lands in the parameter as on the torch
    path: the kernel must not assume finite numbers."""
    nan, inf = float("nan"), float("inf")
    steps = []
    for fused in (True, False):
        torch.manual_seed(7)
        nt = fastff.NeuronTree(4, 3, 2, usage="hard").train()
        opt = (LocalAdam(nt, lr=0.01, local_batch_size=1, fused=fused) if adam
               else LocalSGD(nt, lr=0.1, local_batch_size=1, fused=fused))
        nt(torch.randn(16, 4))                                          # usage: the blocks become ready
        used = (nt.neuron_usage.flatten() >= 1).nonzero()[:, 0]
        assert len(used) >= 3                                           # the root and both children
        grad = torch.zeros_like(nt.w_out)
        grad.view(-1, 3)[used[0]] = nan
        grad.view(-1, 3)[used[1]] = inf
        grad.view(-1, 3)[used[2], 0] = -inf
        nt.w_out.grad = grad
        opt.step()
        steps.append(nt.w_out.detach().view(-1, 3).clone())
    fused, torch_path = steps
    torch.testing.assert_close(fused, torch_path, equal_nan=True, rtol=1e-6, atol=1e-7)
    assert torch.isnan(fused[used[0]]).all()
    if adam:                                                            # inf / sqrt(inf²) is NaN
        assert torch.isnan(fused[used[1]]).all() and torch.isnan(fused[used[2], 0])
    else:
        assert (fused[used[1]] == -inf).all() and fused[used[2], 0] == inf
    rest = torch.ones(len(fused), dtype=torch.bool)
    rest[used[:3]] = False
    assert int(rest.sum()) == len(fused) - 3 and torch.isfinite(fused[rest]).all()


@pytest.mark.parametrize("act", ACTS)
def test_non_finite_inputs_cross_the_training_kernels_as_in_torch(act):
    """NaN and ±inf inputs give the cpu training kernels' outputs and gradients (for a finite
    upstream gradient) NaN / inf at the same places as the torch backend, equal values elsewhere."""
    nan_rows = 0
    for make in (lambda: fastff.NeuronTree(5, 3, 2, trees=2, activation=act),
                 lambda: fastff.FFF(5, 3, 2, 4, activation=act, train_mode="hard_path")):
        torch.manual_seed(8)
        layer = make().to(F64).train()
        x = torch.randn(7, 5, dtype=F64)
        x[1, 2], x[3, 0], x[5, 4] = float("nan"), float("inf"), -float("inf")
        results, g = [], torch.randn(7, 3, dtype=F64)
        for backend in ("cpu", "torch"):
            layer.backend = backend
            xx = x.clone().requires_grad_()
            y = layer(xx)
            results.append([y, *grads(y, [xx, *layer.parameters()], g)])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-9, atol=1e-10)
        nan_rows += int(torch.isnan(results[0][0][1]).all())
    assert nan_rows == 2                                                 # the NaN row is NaN in both layers


def test_act_grad_keeps_nan():
    """NaN in, NaN activation out, for every activation; in the kernel it is inlined into too."""
    from fastff.functional import ACTIVATION_CODES
    from fastff.kernels.numba import common, train

    pre = torch.tensor([float("nan"), -float("inf"), -1.0, 2.0], dtype=F64).view(1, 1, 4).numpy()
    for name, code in ACTIVATION_CODES.items():
        value, _ = common.act_grad(pre[0, 0, 0], code)
        da, h = pre.copy(), pre.copy()
        train.nt_act_grads(pre, np.ones_like(pre), code, da, h)
        assert value != value and h[0, 0, 0] != h[0, 0, 0], name
        assert (h[0, 0, 2:] == h[0, 0, 2:]).all(), name                # finite inputs: no NaN
    relu = ACTIVATION_CODES["relu"]
    h = pre.copy()
    train.nt_act_grads(pre, np.ones_like(pre), relu, pre.copy(), h)
    assert h[0, 0, 1:].tolist() == [0.0, 0.0, 2.0]                        # relu(-inf) is 0, not NaN


def test_local_optimiser_needs_usage():
    with pytest.raises(ValueError, match="usage"):
        LocalSGD(fastff.FFF(3, 2, 2, 2), lr=0.1, local_batch_size=8)
    with pytest.raises(ValueError, match="local_batch_size"):
        LocalSGD(fastff.FFF(3, 2, 2, 2, usage="hard"), lr=0.1, local_batch_size=0)


def test_train_bench_quick_rows():
    rows = train_step_rows(quick=True)
    assert {r["backend"] for r in rows} == {"train-dense", "train-conditional", "train-soft", "train-hard_path"}
    for r in rows:
        assert set(r) == {"layer", "batch", "depth", "backend", "ms", "speedup_vs_dense"}
        assert r["ms"] > 0 and r["speedup_vs_dense"] > 0


@pytest.mark.parametrize("backend", [None, "cpu", "torch", "reference"])
@pytest.mark.parametrize("make", [lambda b: fastff.NeuronTree(13, 7, 3, backend=b),
                                  lambda b: fastff.FFF(13, 7, 3, 2, train_mode="hard_path", backend=b)])
def test_empty_batch_backward(make, backend):
    layer = make(backend).train()
    x = torch.randn(0, 13, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == (0, 13)
    assert all(p.grad is None or (p.grad == 0).all() for p in layer.parameters())
