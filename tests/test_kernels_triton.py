"""Triton kernels (both inference paths, and training) against the reference walks, run on CPU by
Triton's interpreter."""
import os
import sys

# before triton is imported: its jit then builds interpreted functions (a test module collected
# earlier that imports triton would make these kernels compiled ones, unusable on CPU)
assert "triton" not in sys.modules, "triton was imported before tests/test_kernels_triton.py turned its interpreter on"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from fastff.functional import ACTIVATIONS  # noqa: E402
from fastff.kernels import reference as R  # noqa: E402

T = pytest.importorskip("fastff.kernels.triton", reason="triton is installed by `make test`")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp in the interpreter


def fff_params(depth, d_in, leaf, d_out, dtype):
    L = 1 << depth
    return [torch.randn(L - 1, d_in, dtype=dtype), torch.randn(L - 1, dtype=dtype),
            torch.randn(L, d_in, leaf, dtype=dtype), torch.randn(L, leaf, dtype=dtype),
            torch.randn(L, leaf, d_out, dtype=dtype), torch.randn(L, d_out, dtype=dtype)]


FFF_PATHS = {"rows": T.fff_hard_rows, "blocked": T.fff_hard_blocked}
TREE_PATHS = {"rows": T.neuron_tree_rows, "blocked": T.neuron_tree_blocked}


@settings(max_examples=15)
@given(depth=st.integers(0, 7), leaf=st.integers(1, 20), d_in=st.integers(1, 200), d_out=st.integers(1, 150),
       batch=st.sampled_from([0, 1, 2, 5, 33]), dtype=st.sampled_from([torch.float32, torch.float64]),
       activation=st.sampled_from(sorted(ACTIVATIONS)), path=st.sampled_from(sorted(FFF_PATHS)),
       seed=st.integers(0, 2**16))
def test_triton_fff_matches_reference(depth, leaf, d_in, d_out, batch, dtype, activation, path, seed):
    torch.manual_seed(seed)
    params = fff_params(depth, d_in, leaf, d_out, dtype)
    x = torch.randn(batch, d_in, dtype=dtype)
    y = FFF_PATHS[path](x, *params, activation)
    assert y.shape == (batch, d_out) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y, R.fff_hard(x, *params, activation), rtol=tol, atol=tol)


@settings(max_examples=15)
@given(depth=st.integers(0, 7), trees=st.integers(1, 3), d_in=st.integers(1, 200), d_out=st.integers(1, 150),
       batch=st.sampled_from([0, 1, 2, 4, 33]), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       activation=st.sampled_from(sorted(ACTIVATIONS)), path=st.sampled_from(sorted(TREE_PATHS)),
       seed=st.integers(0, 2**16))
def test_triton_neuron_tree_matches_reference(depth, trees, d_in, d_out, batch, bias, dtype, activation, path, seed):
    torch.manual_seed(seed)
    M = (1 << (depth + 1)) - 1
    params = [torch.randn(trees, M, d_in, dtype=dtype), torch.randn(trees, M, dtype=dtype),
              torch.randn(trees, M, d_out, dtype=dtype), torch.randn(d_out, dtype=dtype) if bias else None]
    x = torch.randn(batch, d_in, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(TREE_PATHS[path](x, *params, activation), R.neuron_tree(x, *params, activation),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("path", sorted(FFF_PATHS))
def test_triton_non_contiguous_input(path):
    torch.manual_seed(0)
    params = fff_params(3, 6, 4, 5, torch.float32)
    x = torch.randn(6, 12)[:, ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(FFF_PATHS[path](x, *params, "relu"), R.fff_hard(x, *params, "relu"), rtol=1e-5,
                               atol=1e-5)


def test_triton_errors(monkeypatch):
    params = fff_params(1, 3, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        T.fff_hard(torch.randn(2, 3), *params, "softplus")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        T.fff_hard(torch.randn(2, 3), *params, "relu")


def test_triton_backend_is_registered_and_runs_a_layer():
    import fastff

    torch.manual_seed(1)
    layer = fastff.NeuronTree(9, 4, 3, trees=2, backend="triton").eval()
    x = torch.randn(3, 2, 9)
    with torch.no_grad():
        expected = R.neuron_tree(x.reshape(-1, 9), layer.w_in, layer.b_in, layer.w_out, layer.b_out, "gelu")
        torch.testing.assert_close(layer(x).reshape(-1, 4), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["rows", "blocked"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_triton_nan_row_gives_nan_row(activation, path):
    """Like nn.Linear: a NaN input row gives an all-NaN output row, for every activation."""
    torch.manual_seed(2)
    params = fff_params(2, 5, 3, 4, torch.float32)
    M = 7
    tree = [torch.randn(2, M, 5), torch.randn(2, M), torch.randn(2, M, 4), torch.randn(4)]
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    for y in (FFF_PATHS[path](x, *params, activation), FFF_PATHS[path](x, *params, activation, True),
              TREE_PATHS[path](x, *tree, activation)):
        assert torch.isnan(y[1]).all(), (activation, y[1])
        assert torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("path", sorted(FFF_PATHS))
@pytest.mark.parametrize("depth", [0, 3])
def test_triton_gated_fff_matches_reference(depth, path):
    torch.manual_seed(3)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        params = fff_params(depth, 9, 4, 6, dtype)
        x = torch.randn(7, 9, dtype=dtype)
        torch.testing.assert_close(FFF_PATHS[path](x, *params, "gelu", True), R.fff_hard(x, *params, "gelu", True),
                                   rtol=tol, atol=tol)


def test_triton_row_kernels_refuse_gradients_and_the_dispatch_takes_the_blocked_path():
    params = [p.requires_grad_() for p in fff_params(1, 3, 2, 2, torch.float32)]
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="compute no gradients"):
        T.fff_hard_rows(x, *params, "relu")
    y = T.fff_hard(x, *params, "relu")               # 2 rows < BLOCKED_FROM, but gradients: the blocked path
    assert y.requires_grad
    y.sum().backward()
    assert params[2].grad is not None and params[2].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- training

from fastff.kernels import routing  # noqa: E402
from fastff.kernels.triton_gathered import gathered_combine, gathered_dots  # noqa: E402

from _routing import kept  # noqa: E402


def _grads(y, inputs, g):
    return torch.autograd.grad(y, [t for t in inputs if t is not None], g, allow_unused=True)


def tree_params(trees, depth, d_in, d_out, bias, dtype):
    M = (1 << (depth + 1)) - 1
    return [torch.randn(trees, M, d_in, dtype=dtype, requires_grad=True),
            torch.randn(trees, M, dtype=dtype, requires_grad=True),
            torch.randn(trees, M, d_out, dtype=dtype, requires_grad=True),
            torch.randn(d_out, dtype=dtype, requires_grad=True) if bias else None]


@settings(max_examples=10)
@given(depth=st.integers(0, 5), trees=st.integers(1, 3), d_in=st.integers(1, 70), d_out=st.integers(1, 40),
       batch=st.sampled_from([0, 1, 3, 40]), bias=st.booleans(), route_bias=st.booleans(), gate=st.booleans(),
       straight=st.booleans(), activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_triton_neuron_tree_training_matches_the_reference_autograd(depth, trees, d_in, d_out, batch, bias,
                                                                   route_bias, gate, straight, activation, seed):
    """Values, visited nodes, pre-activations and every gradient (x, w_in, b_in, w_out, b_out) of
    the blocked training path against the masked-dense reference, float64 (exact routing)."""
    torch.manual_seed(seed)
    params = tree_params(trees, depth, d_in, d_out, bias, torch.float64)
    rb = 0.5 * torch.randn(*params[1].shape, dtype=torch.float64) if route_bias else None
    x = torch.randn(batch, d_in, dtype=torch.float64, requires_grad=True)
    straight = gate and straight                                # the straight-through gate (gate's gradient only)
    y, nodes, pre = T.neuron_tree_paths(x, *params, activation, rb, gate, preactivations=True, straight_through=straight)
    y_r, nodes_r, pre_r = R.neuron_tree_paths(x, *params, activation, rb, gate, preactivations=True,
                                              straight_through=straight)
    assert torch.equal(nodes, nodes_r) and nodes.dtype == torch.long
    torch.testing.assert_close(y, y_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pre, pre_r, rtol=1e-10, atol=1e-10)
    g, g_pre = torch.randn_like(y), torch.randn_like(pre)       # a loss on the pre-activations too (balance)
    out = _grads((y * g).sum() + (pre * g_pre).sum(), [x, *params], None)
    ref = _grads((y_r * g).sum() + (pre_r * g_pre).sum(), [x, *params], None)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=10)
@given(depth=st.integers(0, 5), leaf=st.integers(1, 9), d_in=st.integers(1, 70), d_out=st.integers(1, 40),
       batch=st.sampled_from([0, 1, 3, 40]), hardened=st.booleans(), flips=st.booleans(), masked=st.booleans(),
       activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_triton_fff_hard_path_training_matches_the_reference(depth, leaf, d_in, d_out, batch, hardened, flips,
                                                            masked, activation, seed):
    """The FFF hard path (walk with region-leak flips + gated leaf, a hidden-unit mask as dropout
    gives) on the triton training ops against the reference ops: values and every gradient, float64."""
    torch.manual_seed(seed)
    params = [p.requires_grad_() for p in fff_params(depth, d_in, leaf, d_out, torch.float64)]
    x = torch.randn(batch, d_in, dtype=torch.float64, requires_grad=True)
    flip = torch.rand(batch, depth) < 0.3 if flips else None
    mask = (torch.rand(batch, leaf) < 0.7).double() if masked else torch.ones(1, leaf, dtype=torch.float64)

    def run(ops):
        leaves = lambda *a: ops.fff_leaves(*a[:7], mask, a[8])   # the hidden-unit mask chosen here
        return routing.fff_hard_path(ops.fff_walk, leaves, x, *params, activation, flip, hardened)

    (y, q, leaf_t, nodes, logits), (y_r, q_r, leaf_r, nodes_r, logits_r) = run(T), run(R)
    assert torch.equal(leaf_t, leaf_r) and torch.equal(nodes, nodes_r)
    torch.testing.assert_close(y, y_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, logits_r, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    for a, b in zip(_grads(y, [x, *params], g), _grads(y_r, [x, *params], g)):
        if b is None:
            assert a is None or (a == 0).all()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows", [1, 7, 100])
def test_triton_gathered_ops_match_torch_with_shared_rows(rows):
    """gathered_dots / gathered_combine and their gradients against the torch expressions; a
    weight row used by > 32 pairs is summed in several chunks (the root of a tree)."""
    torch.manual_seed(rows)
    R_, S, F = 9, 4, 37
    v, w = torch.randn(rows, F, dtype=torch.float64, requires_grad=True), torch.randn(R_, F, dtype=torch.float64,
                                                                                   requires_grad=True)
    idx = torch.randint(0, R_, (rows, S))
    idx[:, 0] = 3                                                        # every row reads weight row 3
    c = torch.randn(rows, S, dtype=torch.float64, requires_grad=True)
    for out, ref, inputs in ((gathered_dots(v, w, idx), torch.einsum("bi,bsi->bs", v, w[idx]), (v, w)),
                             (gathered_combine(c, w, idx), torch.einsum("bs,bso->bo", c, w[idx]), (c, w))):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(out)
        for a, b in zip(_grads(out, inputs, g), _grads(ref, inputs, g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_training_is_close_to_float32(dtype):
    """bfloat16 / float16 inputs and weights, accumulated in float32: outputs (in the input's dtype)
    and gradients (in each tensor's dtype) within 2% (relative to their norm) of the float32
    reference on the same rounded values, NeuronTree with gate and FFF hard path; rows whose routing
    differs from float32 (a logit within rounding of 0) get no gradient and are left out."""
    torch.manual_seed(4)
    x32 = torch.randn(64, 48).to(dtype).float()
    tree = [p.detach().to(dtype).float() for p in tree_params(2, 4, 48, 24, True, torch.float32)]
    fff = [p.to(dtype).float() for p in fff_params(3, 48, 8, 24, torch.float32)]
    runs = {"neuron-tree": (tree, lambda ops, x, ps: ops.neuron_tree_paths(x, *ps, "gelu", None, True)),
            "fff": (fff, lambda ops, x, ps: routing.fff_hard_path(ops.fff_walk, ops.fff_leaves, x, *ps,
                                                                  "gelu")[0:3:2])}        # (y, leaf)
    for name, (params, run) in runs.items():
        half = [t.to(dtype).requires_grad_() for t in (x32, *params)]
        full = [t.clone().requires_grad_() for t in (x32, *params)]
        (y, paths), (y32, paths32) = run(T, half[0], half[1:]), run(R, full[0], full[1:])
        same = kept((paths == paths32).reshape(len(x32), -1).all(1), 48)
        g = torch.randn_like(y32)
        g[~same] = 0

        def close(a, b):
            assert a.dtype == dtype and torch.linalg.norm(a.float() - b) <= 0.02 * torch.linalg.norm(b), name

        close(y[same], y32[same])
        for a, b in zip(_grads(y, half, g.to(dtype)), _grads(y32, full, g)):
            close(a, b)


@pytest.mark.parametrize("make", [lambda: __import__("fastff").NeuronTree(12, 5, 3, trees=2, gate="path",
                                                                           route_bias=1e-3),
                                  lambda: __import__("fastff").FFF(12, 5, 3, 4, region_leak=0.2, train_mode="hard_path")])
def test_a_layer_trains_on_the_triton_backend_as_on_torch(make):
    """One training step of a layer with backend "triton" gives the loss and gradients of backend "torch"."""
    import copy

    torch.manual_seed(5)
    layer = make().double().train()
    twin = copy.deepcopy(layer)
    layer.backend, twin.backend = "triton", "torch"
    x = torch.randn(37, 12, dtype=torch.float64)
    losses = []
    for m in (layer, twin):
        torch.manual_seed(6)                           # the same region-leak flips
        losses.append(m(x).square().mean())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-10)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(layer.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=name)
