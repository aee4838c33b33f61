"""Core layers against the per-row reference walks."""
import pytest
import torch
from hypothesis import given, strategies as st

import fastff
from fastff.functional import bernoulli_entropy, hard_path, hard_path_from_logits, mixture_weights, node_reach
from fastff.kernels import reference as R

from _routing import kept, route_margin

BATCH_SHAPES = [(), (1,), (7,), (2, 3, 5)]
DTYPES = [torch.float32, torch.float64]


def fff_params(f):
    return f.node_w, f.node_b, f.w1, f.b1, f.w2, f.b2


@given(depth=st.integers(0, 10), leaf=st.integers(1, 32), d_in=st.integers(1, 9), d_out=st.integers(1, 7),
       shape=st.sampled_from(BATCH_SHAPES), dtype=st.sampled_from(DTYPES),
       activation=st.sampled_from(["relu", "gelu"]), seed=st.integers(0, 2**16))
def test_fff_eval_matches_reference_walk(depth, leaf, d_in, d_out, shape, dtype, activation, seed):
    torch.manual_seed(seed)
    f = fastff.FFF(d_in, d_out, depth, leaf, activation=activation).to(dtype).eval()
    x = torch.randn(*shape, d_in, dtype=dtype)
    with torch.no_grad():
        y = f(x)
        x2 = x.reshape(-1, d_in)
        ref = R.fff_hard(x2.double(), *(p.double() for p in fff_params(f)), activation)
    assert y.shape == (*shape, d_out) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    ok = kept(route_margin(x2, f.node_w, f.node_b, depth) > tol, len(x2) // 2)
    torch.testing.assert_close(y.reshape(-1, d_out)[ok].double(), ref[ok], rtol=tol, atol=tol)


@given(depth=st.integers(0, 7), rows=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_hard_path_from_logits_equals_hard_path(depth, rows, seed):
    torch.manual_seed(seed)
    x = torch.randn(rows, 5, dtype=torch.float64)
    w, b = torch.randn((1 << depth) - 1, 5, dtype=torch.float64), torch.randn((1 << depth) - 1, dtype=torch.float64)
    walk, known = hard_path(x, w, b, depth), hard_path_from_logits(x @ w.T + b, depth)
    assert known.nodes.shape == (rows, depth) and known.leaf.shape == (rows,)
    assert torch.equal(walk.nodes, known.nodes) and torch.equal(walk.leaf, known.leaf)
    torch.testing.assert_close(walk.logits, known.logits, rtol=1e-12, atol=1e-12)


@given(depth=st.integers(0, 5), leaf=st.integers(1, 8), d_in=st.integers(1, 6), d_out=st.integers(1, 5),
       batch=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_fff_soft_train_matches_reference(depth, leaf, d_in, d_out, batch, seed):
    torch.manual_seed(seed)
    f = fastff.FFF(d_in, d_out, depth, leaf).double().train()
    x = torch.randn(batch, d_in, dtype=torch.float64)
    torch.testing.assert_close(f(x), R.fff_soft(x, *fff_params(f), "relu"))


@given(depth=st.integers(0, 8), batch=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_mixture_weights_sum_to_one_and_reach_is_consistent(depth, batch, seed):
    torch.manual_seed(seed)
    p = torch.rand(batch, (1 << depth) - 1, dtype=torch.float64)
    mix = mixture_weights(p, depth)
    assert mix.shape == (batch, 1 << depth) and (mix >= 0).all()
    torch.testing.assert_close(mix.sum(-1), torch.ones(batch, dtype=torch.float64))
    reach = node_reach(p, depth)
    if depth:
        torch.testing.assert_close(reach[:, 0], torch.ones(batch, dtype=torch.float64))
        # a node's reach is the summed mixture weight of the leaves below it: check the last level
        last = reach[:, (1 << (depth - 1)) - 1:]
        torch.testing.assert_close(last, mix.view(batch, -1, 2).sum(-1))


@pytest.mark.parametrize("depth", [0, 1, 4])
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_saturated_soft_equals_hard(depth, shape):
    torch.manual_seed(depth)
    f = fastff.FFF(6, 3, depth, 5).double()
    with torch.no_grad():
        f.node_w.mul_(1e6)
        f.node_b.mul_(1e6)
    x = torch.randn(*shape, 6, dtype=torch.float64)
    soft = f.train()(x)
    hard = f.eval()(x)
    torch.testing.assert_close(soft, hard)
    # saturated decisions: entropy is 0 up to exp(-|logit|) terms (|logit| is ~1e5 here)
    assert fastff.hardening_loss(f, mode="mean").item() == pytest.approx(0, abs=1e-20)
    assert fastff.hardening_loss(f, mode="reach").item() == pytest.approx(0, abs=1e-20)


def test_region_leak_swap_rate_and_no_leak_in_eval():
    torch.manual_seed(0)
    f = fastff.FFF(3, 2, 1, 4, region_leak=0.2)
    with torch.no_grad():
        f.node_w.zero_()
        f.node_b.fill_(50.0)  # p = 1: every row goes right unless its decision is swapped
    x = torch.randn(40000, 3)
    f.train()(x)
    swapped = f.aux["route_prob"][0].item()  # mass on the left leaf = observed swap rate
    assert abs(swapped - 0.2) < 0.01
    f.eval()
    y1, y2 = f(x[:100]), f(x[:100])
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, R.fff_hard(x[:100], *fff_params(f), "relu"))


def test_train_hardened_rounds_decisions_and_blocks_node_grads():
    torch.manual_seed(1)
    f = fastff.FFF(4, 2, 3, 3, train_hardened=True).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = f.train()(x)
    torch.testing.assert_close(y, f.eval()(x))
    y.sum().backward()
    assert f.node_w.grad is None or torch.count_nonzero(f.node_w.grad) == 0
    assert torch.count_nonzero(f.w1.grad) > 0


@pytest.mark.parametrize("master", ["scalar", "token"])
def test_master_leaf_blends_tree_and_master(master):
    torch.manual_seed(2)
    f = fastff.FFF(5, 3, 2, 4, master_leaf=master, master_width=6).double().eval()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    x2 = x.reshape(-1, 5)
    tree = R.fff_hard(x2, *fff_params(f), "relu")
    g = torch.sigmoid(f.gate(x2) if master == "token" else f.gate)
    expected = g * tree + (1 - g) * f.master(x2)
    torch.testing.assert_close(f(x).reshape(-1, 3), expected)
    assert f.neurons_per_inference == 2 + 4 + 6 + (master == "token")
    # the blend is trainable
    f.train()(x).sum().backward()
    assert (f.gate.weight.grad if master == "token" else f.gate.grad) is not None


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_usage_counters(mode):
    torch.manual_seed(3)
    f = fastff.FFF(4, 2, 3, 2, usage=mode).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    f.train()(x)
    f.train()(x)
    assert f.leaf_usage.sum().item() == pytest.approx(100)
    assert f.node_usage[0].item() == pytest.approx(100)          # every row passes the root
    # children share their parent's usage
    torch.testing.assert_close(f.node_usage[1] + f.node_usage[2], f.node_usage[0])
    if mode == "hard":
        counts = torch.zeros(8, dtype=torch.float64)
        node = torch.zeros(50, dtype=torch.long)
        for _ in range(3):
            logit = (x * f.node_w[node]).sum(-1) + f.node_b[node]
            node = 2 * node + 1 + (logit >= 0).long()
        counts.index_add_(0, node - 7, torch.ones(50, dtype=torch.float64))
        torch.testing.assert_close(f.leaf_usage, 2 * counts)
        visits = torch.bincount(hard_path(x, f.node_w, f.node_b, 3).nodes.flatten(), minlength=7)
        torch.testing.assert_close(f.node_usage, 2 * visits.double())    # every node on every row's path
    f.eval()(x)
    assert f.leaf_usage.sum().item() == pytest.approx(100)       # eval does not count
    f.reset_usage()
    assert f.leaf_usage.sum().item() == 0


@given(depth=st.integers(0, 6), trees=st.integers(1, 4), d_in=st.integers(1, 7), d_out=st.integers(1, 5),
       shape=st.sampled_from(BATCH_SHAPES), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_neuron_tree_matches_reference_walk(depth, trees, d_in, d_out, shape, dtype, seed):
    torch.manual_seed(seed)
    n = fastff.NeuronTree(d_in, d_out, depth, trees=trees).to(dtype)
    x = torch.randn(*shape, d_in, dtype=dtype)
    x2 = x.reshape(-1, d_in).double()
    ref = R.neuron_tree(x2, n.w_in.double(), n.b_in.double(), n.w_out.double(), n.b_out.double(), "gelu")
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    ok = kept(torch.stack([route_margin(x2, n.w_in[k], n.b_in[k], depth + 1) for k in range(trees)]).amin(0) > tol,
              len(x2) // 2)
    for mode in (n.train, n.eval):
        mode()
        with torch.no_grad():
            y = n(x)
        assert y.shape == (*shape, d_out)
        torch.testing.assert_close(y.reshape(-1, d_out)[ok].double(), ref[ok], rtol=tol, atol=tol)


@given(depth=st.integers(0, 5), trees=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_neuron_tree_gradients_equal_masked_dense(depth, trees, seed):
    torch.manual_seed(seed)
    n = fastff.NeuronTree(5, 3, depth, trees=trees).double().train()
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    params = [x, n.w_in, n.b_in, n.w_out, n.b_out]
    g = torch.autograd.grad(n(x).square().sum(), params)
    ref = R.neuron_tree_masked_dense(x.reshape(-1, 5), n.w_in, n.b_in, n.w_out, n.b_out, "gelu")
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # untouched neurons get exactly zero gradient
    visited = torch.zeros(trees, n.neurons_per_tree, dtype=torch.bool)
    visits = R.neuron_tree_visits(x.detach().reshape(-1, 5), n.w_in, n.b_in)
    for k in range(trees):
        visited[k, visits[:, k].flatten()] = True
    unvisited = ~visited                              # 6 rows visit at most 6 (depth + 1) neurons per tree
    assert int(unvisited.sum()) >= trees * max(0, n.neurons_per_tree - 6 * (depth + 1))
    assert torch.count_nonzero(g[1][unvisited]) == 0


def test_neuron_tree_gradcheck():
    torch.manual_seed(4)
    n = fastff.NeuronTree(4, 3, 2, trees=2).double().train()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(n, (x,))


@pytest.mark.parametrize("trees", [1, 3, 8])
def test_neuron_tree_depth0_is_dense_ff(trees):
    torch.manual_seed(5)
    n = fastff.NeuronTree(6, 4, 0, trees=trees).double()
    d = fastff.DenseFF(6, 4, trees).double()
    with torch.no_grad():
        d.fc1.weight.copy_(n.w_in[:, 0])
        d.fc1.bias.copy_(n.b_in[:, 0])
        d.fc2.weight.copy_(n.w_out[:, 0].T)
        d.fc2.bias.copy_(n.b_out)
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(n, mode)()
        torch.testing.assert_close(n(x), d(x))


@pytest.mark.parametrize("gate", ["softmax", "straight-through"])
@pytest.mark.parametrize("k", [1, 2])
def test_moe_matches_dense_topk_reference(k, gate):
    torch.manual_seed(6)
    m = fastff.MoE(5, 3, experts=4, expert_width=6, k=k, gate=gate).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    x2 = x.reshape(-1, 5)
    probs = torch.softmax(m.router(x2), -1)
    expected = torch.zeros(14, 3, dtype=torch.float64)
    for b in range(14):
        top = probs[b].topk(k)
        if gate == "straight-through":
            w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            w = top.values / top.values.sum() if k > 1 else top.values
        for g, e in zip(w, top.indices):
            h = torch.nn.functional.gelu(x2[b] @ m.w1[e] + m.b1[e])
            expected[b] += g * (h @ m.w2[e] + m.b2[e])
    for mode in (m.train, m.eval):
        mode()
        torch.testing.assert_close(m(x).reshape(-1, 3), expected)
    assert m.neurons_per_inference == 4 + k * 6


@pytest.mark.parametrize("k", [1, 3])
def test_moe_straight_through_gate_gives_the_router_the_log_probability_gradient(k):
    """The router's gradient of the straight-through MoE equals that of the surrogate
    sum over rows and chosen experts of log p · <upstream, expert output> / k."""
    torch.manual_seed(9)
    m = fastff.MoE(5, 3, experts=4, expert_width=6, k=k, gate="straight-through").double()
    x, up = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    (m(x) * up).sum().backward()
    got = m.router.weight.grad.clone()
    m.router.weight.grad = None
    log_p = torch.log_softmax(m.router(x), -1)
    chosen = log_p.topk(k, dim=-1).indices                                     # (B, k)
    with torch.no_grad():
        h = torch.nn.functional.gelu(torch.einsum("bi,bkih->bkh", x, m.w1[chosen]) + m.b1[chosen])     # (B, k, H)
        out = torch.einsum("bkh,bkho->bko", h, m.w2[chosen]) + m.b2[chosen]                          # (B, k, out)
        value = torch.einsum("bko,bo->bk", out, up)                          # <upstream, expert output>
    (log_p.gather(1, chosen) * value / k).sum().backward()
    torch.testing.assert_close(got, m.router.weight.grad)


def test_moe_rejects_an_unknown_gate():
    with pytest.raises(ValueError, match="gate"):
        fastff.MoE(5, 3, experts=4, expert_width=6, gate="path")


@pytest.mark.parametrize("make", [lambda: fastff.FFF(7, 3, 3, 4, master_leaf="token", usage="soft"),
                                  lambda: fastff.NeuronTree(7, 3, 4, trees=2),
                                  lambda: fastff.MoE(7, 3, 4, 5, k=2),
                                  lambda: fastff.DenseFF(7, 3, 9)])
def test_state_dict_round_trip_is_bit_identical(make, tmp_path):
    torch.manual_seed(7)
    a = make().eval()
    torch.save(a.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(8)
    b = make().eval()
    b.load_state_dict(torch.load(tmp_path / "w.pt"))
    x = torch.randn(33, 7)
    assert torch.equal(a(x), b(x))


def test_entropy_is_stable_and_zero_when_saturated():
    z = torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4], dtype=torch.float64)
    h = bernoulli_entropy(z)
    assert h[0] == 0 and h[-1] == 0
    assert h[2].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    torch.testing.assert_close(h, bernoulli_entropy(-z))


@pytest.mark.parametrize("bias", [-1e-9, -1e-30, 0.0, 1e-30])
def test_train_hardened_decides_on_the_logit_sign_like_eval(bias):
    """sigmoid(-1e-9) rounds to 0.5 in float32; the hardened decision still follows the sign of
    the logit, as eval and hard_path do."""
    f = fastff.FFF(3, 2, 1, 2, train_hardened=True)
    with torch.no_grad():
        f.node_w.zero_()
        f.node_b.fill_(bias)
    x = torch.randn(6, 3)
    with torch.no_grad():
        torch.testing.assert_close(f.train()(x), f.eval()(x), rtol=0, atol=1e-6)
        leaf = 1 if bias >= 0 else 0
        torch.testing.assert_close(f.eval()(x), torch.relu(x @ f.w1[leaf] + f.b1[leaf]) @ f.w2[leaf] + f.b2[leaf])
