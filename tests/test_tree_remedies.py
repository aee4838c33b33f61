"""NeuronTree options for trees that leave capacity unused: the routing offset ``route_bias``
(balanced by its own update), the path gate (a gradient for the routing decisions), the
node-balance loss and the always-on ``dense_slice``."""
import copy
import json
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

import fastff
from fastff import kernels
from fastff.apps.cli import main
from fastff.functional import ACTIVATIONS, tree_size
from fastff.kernels import cpu, reference as R, vectorized as V
from fastff.layers import families as F
from fastff.training import node_balance_loss
from fastff.training.run import aux_loss

F64 = torch.float64
LEAD = [(), (3,), (2, 3)]


def tree_weights(depth, trees, bias, seed, inp=5, out=4):
    gen = torch.Generator().manual_seed(seed)
    M = tree_size(depth)
    w_in = torch.randn(trees, M, inp, generator=gen, dtype=F64, requires_grad=True)
    b_in = torch.randn(trees, M, generator=gen, dtype=F64, requires_grad=True)
    w_out = torch.randn(trees, M, out, generator=gen, dtype=F64, requires_grad=True)
    b_out = torch.randn(out, generator=gen, dtype=F64, requires_grad=True) if bias else None
    route_bias = torch.randn(trees, M, generator=gen, dtype=F64)
    return [w_in, b_in, w_out, b_out], route_bias


def grads(out, tensors, g):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], g, allow_unused=True,
                               materialize_grads=True, retain_graph=True)


# gate option of a layer -> the backends' (gate, straight_through) flags
GATE_FLAGS = {"none": (False, False), "path": (True, False), "straight-through": (True, True)}


@given(depth=st.integers(0, 5), trees=st.integers(1, 3), rows=st.integers(0, 12), act=st.sampled_from(list(ACTIVATIONS)),
       bias=st.booleans(), offset=st.booleans(), gate_option=st.sampled_from(list(GATE_FLAGS)),
       seed=st.integers(0, 2**16))
def test_torch_path_equals_the_per_row_walk(depth, trees, rows, act, bias, offset, gate_option, seed):
    """Values, visited nodes, pre-activations and gradients (float64) of the torch path equal the
    per-row reference walk and the masked-dense reference, with a random offset and either gate."""
    weights, route_bias = tree_weights(depth, trees, bias, seed)
    route_bias = route_bias if offset else None
    gate, straight = GATE_FLAGS[gate_option]
    x = torch.randn(rows, 5, dtype=F64, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    y_ref = R.neuron_tree(x, *weights, act, route_bias, gate, straight_through=straight)
    y, nodes, pre = V.neuron_tree_paths(x, *weights, act, route_bias, gate, preactivations=True,
                                        straight_through=straight)
    y_md, visits, pre_md = R.neuron_tree_paths(x, *weights, act, route_bias, gate, preactivations=True,
                                               straight_through=straight)
    if straight:                                      # the forward is the plain tree's
        torch.testing.assert_close(y_ref, R.neuron_tree(x, *weights, act, route_bias), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_md, y_ref, rtol=1e-12, atol=1e-12)
    if not straight:
        torch.testing.assert_close(V.neuron_tree(x, *weights, act, route_bias, gate), y_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(nodes, visits) and torch.equal(nodes, R.neuron_tree_visits(x, *weights[:2], route_bias))
    torch.testing.assert_close(pre, pre_md, rtol=1e-12, atol=1e-12)
    if rows:
        g, g_pre = torch.randn_like(y), torch.randn_like(pre)
        expected = grads(y_ref, [x, *weights], g)
        for got, want in zip(grads(y, [x, *weights], g), expected):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        both = grads((y, pre), [x, *weights], (g, g_pre))
        for got, want in zip(both, grads((y_md, pre_md), [x, *weights], (g, g_pre))):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@given(depth=st.integers(0, 4), trees=st.integers(1, 3), lead=st.sampled_from(LEAD), rows=st.integers(1, 6),
       act=st.sampled_from(list(ACTIVATIONS)), gate=st.sampled_from(list(GATE_FLAGS)), seed=st.integers(0, 2**16))
def test_layer_agrees_on_torch_and_reference_with_leading_dims(depth, trees, lead, rows, act, gate, seed):
    torch.manual_seed(seed)
    layer = fastff.NeuronTree(5, 4, depth, trees, activation=act, route_bias=0.1, gate=gate, dense_slice=2).to(F64)
    layer.route_bias.normal_()
    x = torch.randn(*lead, rows, 5, dtype=F64)
    outs = {}
    for backend in ("torch", "reference", "auto", "cpu"):
        layer.backend = backend
        outs[backend] = layer.eval()(x)
    assert outs["torch"].shape == (*lead, rows, 4)
    torch.testing.assert_close(outs["torch"], outs["reference"], rtol=1e-12, atol=1e-12)
    assert torch.equal(outs["auto"], outs["cpu"])
    torch.testing.assert_close(outs["cpu"], outs["torch"], rtol=1e-12, atol=1e-12)


def test_cpu_preactivations_have_the_torch_gradients():
    """The numba training op returns the visited pre-activations, differentiable like the torch path's."""
    weights, _ = tree_weights(3, 2, True, 0)
    x = torch.randn(9, 5, dtype=F64, requires_grad=True)
    y, nodes, pre = cpu.neuron_tree_paths(x, *weights, "gelu", preactivations=True)
    y_t, nodes_t, pre_t = V.neuron_tree_paths(x, *weights, "gelu", preactivations=True)
    assert torch.equal(nodes, nodes_t)
    torch.testing.assert_close(pre, pre_t)
    g, g_pre = torch.randn_like(y), torch.randn_like(pre)
    for got, want in zip(grads((y, pre), [x, *weights], (g, g_pre)), grads((y_t, pre_t), [x, *weights], (g, g_pre))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert len(cpu.neuron_tree_paths(x, *weights, "gelu")) == 2          # the default return is unchanged


@given(depth=st.integers(0, 5), trees=st.integers(1, 3), rows=st.integers(0, 12), act=st.sampled_from(list(ACTIVATIONS)),
       bias=st.booleans(), options=st.sampled_from(["route_bias", "gate", "both", "straight-through"]),
       seed=st.integers(0, 2**16))
def test_cpu_path_with_the_options_equals_the_torch_path(depth, trees, rows, act, bias, options, seed):
    """The numba path of the routing options (walk, gathered-row ops): visited nodes, values,
    pre-activations and gradients (float64) equal the torch path's, with and without gradient."""
    weights, route_bias = tree_weights(depth, trees, bias, seed)
    route_bias, gate = (None if options == "gate" else route_bias), options != "route_bias"
    straight = options == "straight-through"
    x = torch.randn(rows, 5, dtype=F64, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    y, nodes, pre = cpu.neuron_tree_paths(x, *weights, act, route_bias, gate, preactivations=True,
                                          straight_through=straight)
    y_t, nodes_t, pre_t = V.neuron_tree_paths(x, *weights, act, route_bias, gate, preactivations=True,
                                              straight_through=straight)
    assert torch.equal(nodes, nodes_t) and y.shape == (rows, 4)
    torch.testing.assert_close(y, y_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre, pre_t, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        served = dict(route_bias=route_bias) if straight else dict(route_bias=route_bias, gate=gate)
        torch.testing.assert_close(cpu.neuron_tree(x, *weights, act, **served), y_t, rtol=1e-12, atol=1e-12)
    if rows:
        g, g_pre = torch.randn_like(y), torch.randn_like(pre)
        for got, want in zip(grads((y, pre), [x, *weights], (g, g_pre)), grads((y_t, pre_t), [x, *weights], (g, g_pre))):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("options", [dict(route_bias=0.05), dict(gate="path"), dict(route_bias=0.05, gate="path"),
                                     dict(gate="straight-through")])
def test_cpu_float32_training_step_equals_the_torch_path(options):
    """One training step per backend from the same state: outputs, every gradient, the node-balance
    aux (and its gradient) and the updated offset agree (float32 tolerance; the offset exactly)."""
    torch.manual_seed(1)
    first = fastff.NeuronTree(16, 8, 4, trees=2, dense_slice=3, backend="cpu", **options).train()
    if "route_bias" in options:
        first.route_bias.normal_(std=0.3)
    second = copy.deepcopy(first)
    second.backend = "torch"
    x = torch.randn(64, 16)
    results = []
    for layer in (first, second):
        y = layer(x)
        (y.square().mean() + node_balance_loss(layer, 0.5)).backward()
        results.append([y.detach(), layer.aux["node_balance"].detach()]
                       + [p.grad for p in layer.parameters()] + list(layer.buffers()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if "route_bias" in options:
        assert torch.equal(first.route_bias, second.route_bias) and first.route_bias.abs().sum() > 0


@pytest.mark.parametrize("options", [dict(gate="path"), dict(route_bias=0.05), dict(route_bias=0.05, gate="path"),
                                     dict(dense_slice=3), dict(gate="path", dense_slice=3),
                                     dict(gate="straight-through", route_bias=0.05)])
def test_train_forward_equals_eval_forward(options):
    torch.manual_seed(0)
    layer = fastff.NeuronTree(6, 3, 4, trees=2, **options).to(F64)
    x = torch.randn(2, 17, 6, dtype=F64)
    with torch.no_grad():
        before = layer.route_bias.clone() if "route_bias" in options else None
        y_eval = layer.eval()(x)
        if before is not None:
            assert torch.equal(layer.route_bias, before)                  # eval does not update the offset
    y_train = layer.train()(x)                                             # uses the offset eval used, then updates it
    torch.testing.assert_close(y_train, y_eval, rtol=1e-12, atol=1e-12)
    if before is not None:
        assert not torch.equal(layer.route_bias, before)


def root_right_fraction(layer, x):
    route_bias = layer.routed_options().get("route_bias")
    return R.neuron_tree_visits(x, layer.w_in, layer.b_in, route_bias)[:, 0, 1].remainder(2).eq(0).double().mean()


def test_route_bias_update_moves_an_imbalanced_node_towards_half():
    torch.manual_seed(0)
    layer = fastff.NeuronTree(4, 2, 2, route_bias=0.25).to(F64).train()
    with torch.no_grad():
        layer.b_in[0, 0] = 0.5
        layer.w_in[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    x = torch.randn(512, 4, dtype=F64)
    x[:, 0] = x[:, 0].abs()                                                # root pre-activation >= 0.5: all go right
    fractions = [root_right_fraction(layer, x).item()]
    layer(x)
    assert layer.route_bias[0, 0].item() == -0.25
    assert torch.equal(layer.route_bias[0, [1, 3, 4]], torch.zeros(3, dtype=F64))   # the left subtree: not reached
    for _ in range(5):
        fractions.append(root_right_fraction(layer, x).item())
        layer(x)
    assert fractions[0] == 1.0 and min(abs(f - 0.5) for f in fractions) < 0.1 and abs(fractions[-1] - 0.5) < 0.2
    assert all(a >= b for a, b in zip(fractions, fractions[1:5]))        # down to the median, then around it
    assert torch.equal(layer.route_bias[0, 3:], torch.zeros(4, dtype=F64))           # deepest level: no decision


def test_route_bias_leaves_exactly_balanced_nodes_alone():
    layer = fastff.NeuronTree(1, 1, 1, route_bias=0.5).to(F64).train()
    with torch.no_grad():
        layer.w_in.fill_(1.0)
        layer.b_in.zero_()
    layer(torch.tensor([[-1.0], [1.0], [-2.0], [2.0]], dtype=F64))
    assert torch.equal(layer.route_bias, torch.zeros(1, 3, dtype=F64))


def test_capacity_routing_uses_the_offset():
    torch.manual_seed(0)
    layer = fastff.NeuronTree(5, 3, 3, trees=2, route_bias=0.1).to(F64)
    layer.route_bias.normal_(std=3.0)
    x = torch.randn(40, 5, dtype=F64)
    r = F.family("neuron-tree").routing(layer, x)
    visits = R.neuron_tree_visits(x, layer.w_in, layer.b_in, layer.route_bias)
    assert torch.equal(r.units[3], visits[..., 3] - 7 + torch.arange(2) * 8)
    logit = x @ layer.w_in[1, 0] + layer.b_in[1, 0] + layer.route_bias[1, 0]
    torch.testing.assert_close(r.logits[0][:, 1], logit)


# ----------------------------------------------------------------------------- node balance

def split_tree(bias: float):
    """A depth-1 tree on 1 feature whose root pre-activation is x + bias."""
    layer = fastff.NeuronTree(1, 1, 1).to(F64)
    with torch.no_grad():
        layer.w_in.fill_(1.0)
        layer.b_in.fill_(bias)
    return layer


def test_node_balance_is_zero_when_balanced_and_grows_with_imbalance():
    x = torch.tensor([[-2.0], [2.0], [-0.5], [0.5]], dtype=F64)
    balanced = split_tree(0.0).train()
    balanced(x)
    assert node_balance_loss(balanced, 1.0).item() == pytest.approx(0.0, abs=1e-15)
    losses = []
    for bias in (0.5, 1.0, 3.0):
        layer = split_tree(bias).train()
        layer(x)
        losses.append(node_balance_loss(layer, 1.0).item())
        expected = (torch.sigmoid(x[:, 0] + bias).mean() - 0.5) ** 2                # root: reached by every row
        assert losses[-1] == pytest.approx(expected.item())
    assert 0 < losses[0] < losses[1] < losses[2] <= 0.25
    assert node_balance_loss(layer, 0.1).item() == pytest.approx(0.1 * losses[-1])


def test_node_balance_weights_nodes_by_reach_and_gives_routing_a_gradient():
    torch.manual_seed(0)
    layer = fastff.NeuronTree(5, 3, 3, trees=2).to(F64).train()
    x = torch.randn(30, 5, dtype=F64)
    layer(x)
    loss = node_balance_loss(layer, 1.0)
    visits = R.neuron_tree_visits(x, layer.w_in, layer.b_in)
    expected = 0.0
    for k in range(2):
        for node in range(7):                                              # the decision nodes of depth 3
            rows = (visits[:, k, :3] == node).any(1)
            if rows.any():
                p = torch.sigmoid(x[rows] @ layer.w_in[k, node] + layer.b_in[k, node])
                expected += rows.double().mean() * (p.mean() - 0.5) ** 2
    assert loss.item() == pytest.approx(expected.item())
    assert torch.equal(layer.aux["node_balance"][:, 7:], torch.zeros(2, 8, dtype=F64))   # deepest level
    g_w, g_b = torch.autograd.grad(loss, [layer.w_in, layer.b_in])
    assert g_w[:, :7].abs().sum() > 0 and g_b[:, :7].abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
def test_node_balance_is_the_same_on_every_training_backend(backend):
    torch.manual_seed(0)
    layer = fastff.NeuronTree(5, 3, 3, trees=2, backend=backend).to(F64).train()
    x = torch.randn(20, 5, dtype=F64)
    layer(x)
    loss = node_balance_loss(layer, 1.0)
    g = torch.autograd.grad(loss, [layer.w_in, layer.b_in])
    layer.backend = "torch"
    layer(x)
    torch.testing.assert_close(node_balance_loss(layer, 1.0), loss)
    for got, want in zip(g, torch.autograd.grad(node_balance_loss(layer, 1.0), [layer.w_in, layer.b_in])):
        torch.testing.assert_close(got, want)


def test_node_balance_needs_a_training_forward_and_joins_the_run_core_balance():
    layer = fastff.NeuronTree(4, 2, 2)
    with pytest.raises(RuntimeError, match="NeuronTree layer and a training-mode forward"):
        node_balance_loss(layer)
    layer.eval()(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="training-mode forward"):
        node_balance_loss(layer)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), fastff.NeuronTree(2, 2, 1)).train()
    model(torch.randn(8, 4))
    assert aux_loss(model, balance=0.0) == 0.0
    torch.testing.assert_close(aux_loss(model, balance=0.3), node_balance_loss(model, 0.3))
    torch.testing.assert_close(node_balance_loss(model, 1.0),
                               node_balance_loss(model[0], 1.0) + node_balance_loss(model[2], 1.0))
    assert "node_balance" in F.family("neuron-tree").aux_losses


def test_straight_through_gate_gradient_of_a_depth_1_tree():
    """One row, one tree of depth 1: y = act(a0)·w0 + act(a1)·w1 in value (a1: the visited child),
    and the root's bias gets act'(a0)·w0 + act(a1)·w1 · d log sigmoid(|a0|) / d a0 (the path gate's
    relative gradient, (1 - sigmoid(|a0|))·sign(a0)), written out here by hand."""
    torch.manual_seed(3)
    layer = fastff.NeuronTree(4, 2, 1, gate="straight-through", bias=False, backend="torch").to(F64)
    x = torch.randn(1, 4, dtype=F64)
    g = torch.randn(1, 2, dtype=F64)
    (layer.train()(x) * g).sum().backward()
    with torch.no_grad():
        a = x[0] @ layer.w_in[0].T + layer.b_in[0]                       # (3,) all nodes' pre-activations
        child = 2 if a[0] >= 0 else 1
        gelu, dgelu = torch.nn.functional.gelu, lambda t: torch.func.grad(torch.nn.functional.gelu)(t)
        y = gelu(a[0]) * layer.w_out[0, 0] + gelu(a[child]) * layer.w_out[0, child]
        dlog_gate = (1 - torch.sigmoid(a[0].abs())) * torch.sign(a[0])
        root = dgelu(a[0]) * (g[0] @ layer.w_out[0, 0]) + (g[0] @ (gelu(a[child]) * layer.w_out[0, child])) * dlog_gate
        torch.testing.assert_close(layer.eval()(x)[0], y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.b_in.grad[0, 0], root, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.b_in.grad[0, child], dgelu(a[child]) * (g[0] @ layer.w_out[0, child]),
                               rtol=1e-12, atol=1e-12)   # the deepest decision leads nowhere: no gate gradient
    assert layer.b_in.grad[0, 3 - child] == 0                                   # the unvisited child


# ----------------------------------------------------------------------------- backends, geometry, files

@pytest.mark.parametrize("options", [dict(route_bias=1e-3), dict(gate="path")])
def test_the_plain_numba_tree_kernel_refuses_the_routing_options(options):
    layer = fastff.NeuronTree(4, 2, 2, **options)
    with pytest.raises(ValueError, match="plain tree"):
        F.family("neuron-tree").cpu_kernel(layer)


def test_a_straight_through_tree_serves_on_the_plain_kernels():
    """gate="straight-through" changes only training: eval is the plain tree, on the numba kernel
    and through the prepared plain path, equal to a gate="none" layer with the same weights."""
    layer = fastff.NeuronTree(4, 2, 2, gate="straight-through")
    plain = fastff.NeuronTree(4, 2, 2)
    plain.load_state_dict(layer.state_dict())
    assert layer.routed_options() == {} and layer.training_options() == dict(gate=True, straight_through=True)
    F.family("neuron-tree").cpu_kernel(layer)                                   # accepted
    x = torch.randn(7, 4)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), plain.eval()(x))
        torch.testing.assert_close(layer.train()(x), plain.eval()(x))


@pytest.mark.parametrize("options", [dict(route_bias=1e-3), dict(gate="path")])
def test_auto_runs_the_routing_options_on_cpu_for_float32_and_float64(options):
    """"auto" (the default) runs training and eval under autograd on the "cpu" differentiable path,
    no-grad eval on the prepared walk, for CPU float32/64 tensors; on "torch" for other dtypes."""
    layer = fastff.NeuronTree(4, 2, 3, **options)
    x = torch.randn(5, 4)
    with mock.patch.object(V, "neuron_tree_paths", side_effect=AssertionError("torch path")), \
            mock.patch.object(cpu, "prepare", wraps=cpu.prepare) as prepared_path, \
            mock.patch.object(cpu, "neuron_tree_paths", wraps=cpu.neuron_tree_paths) as cpu_path:
        layer.train()(x).sum().backward()
        layer.eval()(x)
        assert cpu_path.call_count == 2 and prepared_path.call_count == 0
        with torch.no_grad():
            layer(x)
            layer(x[:1])
    assert cpu_path.call_count == 2 and prepared_path.call_count == 1      # prepared once, then reused
    layer.to(torch.bfloat16)
    with mock.patch.object(cpu, "neuron_tree_paths", side_effect=AssertionError("cpu path")), \
            mock.patch.object(V, "neuron_tree_paths", wraps=V.neuron_tree_paths) as torch_path:
        layer.train()(x.bfloat16()).sum().backward()
        with torch.no_grad():
            layer.eval()(x.bfloat16())
    assert torch_path.call_count == 2


@given(depth=st.integers(0, 5), trees=st.integers(1, 3), lead=st.sampled_from(LEAD),
       rows=st.sampled_from([0, 1, 2, 7, cpu.THROUGHPUT_MIN_ROWS + 3]), act=st.sampled_from(list(ACTIVATIONS)),
       bias=st.booleans(), options=st.sampled_from(["route_bias", "gate", "both"]),
       dtype=st.sampled_from([torch.float32, F64]), seed=st.integers(0, 2**16))
def test_prepared_walk_with_the_options_equals_the_reference(depth, trees, lead, rows, act, bias, options, dtype, seed):
    """The no-grad eval fast path (numba walk with the routing offset and the path gate; small and
    throughput batch sizes, leading dims) equals the reference per-row walk."""
    torch.manual_seed(seed)
    layer = fastff.NeuronTree(7, 3, depth, trees, activation=act, bias=bias, route_bias=0.1 * (options != "gate"),
                              gate="none" if options == "route_bias" else "path").to(dtype).eval()
    if options != "gate":
        layer.route_bias.normal_()
    x = torch.randn(*lead, rows, 7, dtype=dtype)
    with torch.no_grad():
        got = layer(x)
        layer.backend = "reference"
        want = layer(x)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is F64 else dict(rtol=2e-5, atol=2e-5)
    assert got.shape == (*lead, rows, 3)
    torch.testing.assert_close(got, want, **tol)


def test_dense_slice_is_added_to_every_row_and_counted():
    torch.manual_seed(0)
    layer = fastff.NeuronTree(6, 3, 3, trees=2, activation="relu", dense_slice=5)
    assert isinstance(layer.dense, fastff.DenseFF) and layer.dense.hidden == 5 and layer.dense.activation == "relu"
    assert (layer.training_width, layer.neurons_per_inference) == (2 * 15 + 5, 2 * 4 + 5)
    x = torch.randn(2, 7, 6)
    tree = R.neuron_tree(x.reshape(-1, 6), layer.w_in, layer.b_in, layer.w_out, layer.b_out, "relu")
    want = tree.reshape(2, 7, 3) + layer.dense(x)
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), want)
    with torch.no_grad():                                                   # the prepared eval path adds it too
        torch.testing.assert_close(layer.eval()(x), want)
        torch.testing.assert_close(layer(x[0, :1]), want[0, :1])
    layer.train()(x).sum().backward()
    assert layer.dense.fc1.weight.grad.abs().sum() > 0
    fam = F.family("neuron-tree")
    geo = fam.geometry(64, dict(trees=2, dense_slice=16))                  # the trees take what the slice leaves
    built = fam.build(6, 3, 64, dict(trees=2, dense_slice=16))
    assert built.depth == 3 and (geo.training_width, geo.neurons_per_token) == (46, 24)
    assert (built.training_width, built.neurons_per_inference) == (46, 24)
    with pytest.raises(ValueError, match="width must be >= trees \\+ dense_slice"):
        fam.build(6, 3, 17, dict(trees=2, dense_slice=16))
    with pytest.raises(ValueError, match="neuron-tree option 'gate' must be one of 'none', 'path'"):
        fam.build(6, 3, 15, dict(gate="soft"))
    with pytest.raises(ValueError, match="route_bias"):
        fastff.NeuronTree(4, 2, 2, route_bias=-1.0)


def test_save_load_round_trip_keeps_the_offset(tmp_path):
    torch.manual_seed(0)
    layer = fastff.NeuronTree(5, 3, 3, trees=2, route_bias=0.01, gate="path", dense_slice=4)
    layer.train()(torch.randn(64, 5))
    assert layer.route_bias.abs().sum() > 0 and "route_bias" in layer.state_dict()
    fastff.save(layer, tmp_path / "nt.safetensors")
    back = fastff.load(tmp_path / "nt.safetensors")
    assert (back.route_bias_rate, back.gate, back.dense_slice) == (0.01, "path", 4)
    assert torch.equal(back.route_bias, layer.route_bias)
    x = torch.randn(9, 5)
    assert torch.equal(back.eval()(x), layer.eval()(x))
    plain = fastff.NeuronTree(5, 3, 3)
    assert "route_bias" not in plain.state_dict() and plain.dense is None   # defaults: the state dict is as before


def test_lm_train_with_the_tree_options(tmp_path):
    words = "the king queen lord lady good my thou art love death night day heart crown".split()
    gen = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(words[i] for i in torch.randint(len(words), (6,), generator=gen).tolist()) + "."
                     for _ in range(200))
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "run"
    assert main(["lm", "train", "--text", str(tmp_path / "t.txt"), "--ffn", "neuron-tree", "--depth", "3",
                 "--route-bias", "1e-3", "--gate", "path", "--dense-slice", "4", "--balance", "0.1",
                 "--layers", "1", "--dim", "16", "--heads", "2", "--context", "16", "--steps", "6", "--batch", "4",
                 "--eval-every", "3", "--eval-batches", "1", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    options = config["model"]["ffn_options"]
    assert (options["route_bias"], options["gate"], options["dense_slice"]) == (1e-3, "path", 4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ffn_neurons_per_token"] == 4 + 4 and math.isfinite(metrics["val_loss"])
    from fastff.training import lm as L
    model, _, _ = L.load_run(out)
    tree = next(m for m in model.modules() if isinstance(m, fastff.NeuronTree))
    assert tree.gate == "path" and tree.dense_slice == 4 and tree.route_bias.abs().sum() > 0


@pytest.mark.parametrize("ffn, flags, gate, balance", [
    ("neuron-tree", [], "path", 0.01),                          # the long regime's winning remedy is the default
    ("neuron-tree", ["--gate", "none", "--balance", "0"], "none", 0.0),
    ("neuron-tree", ["--gate", "straight-through"], "straight-through", 0.01),
    ("moe", [], "softmax", 0.01), ("moe", ["--gate", "straight-through"], "straight-through", 0.01),
    ("dense", [], None, 0.0)])
def test_lm_train_defaults_to_the_path_gate_and_balance(tmp_path, ffn, flags, gate, balance):
    (tmp_path / "t.txt").write_text("to be or not to be, that is the question. " * 60)
    out = tmp_path / "run"
    width = ["--depth", "2"] if ffn == "neuron-tree" else ["--width", "8"]
    assert main(["lm", "train", "--text", str(tmp_path / "t.txt"), "--ffn", ffn, *width, *flags, "--layers", "1",
                 "--dim", "8", "--heads", "2", "--context", "8", "--steps", "2", "--batch", "2", "--eval-every", "2",
                 "--eval-batches", "1", "--capacity-tokens", "0", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["ffn_options"].get("gate") == gate and config["train"]["balance"] == balance


def test_lm_train_refuses_a_gate_of_another_family(tmp_path):
    """--gate is shared by neuron-tree and moe, each with its own values: a tree's gate given to a
    MoE is an error naming the MoE's."""
    (tmp_path / "t.txt").write_text("to be or not to be, that is the question. " * 60)
    with pytest.raises(ValueError, match="moe option 'gate' must be one of 'softmax', 'straight-through'; got 'path'"):
        main(["lm", "train", "--text", str(tmp_path / "t.txt"), "--ffn", "moe", "--width", "8", "--gate", "path",
              "--layers", "1", "--dim", "8", "--heads", "2", "--context", "8", "--steps", "2", "--batch", "2",
              "--out", str(tmp_path / "run"), "--quiet"])
