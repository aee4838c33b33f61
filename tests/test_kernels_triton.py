"""Triton kernels against the reference walks, run on CPU by Triton's interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined: jit then builds interpreted functions

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


@settings(max_examples=15)
@given(depth=st.integers(0, 7), leaf=st.integers(1, 20), d_in=st.integers(1, 200), d_out=st.integers(1, 150),
       batch=st.integers(0, 5), dtype=st.sampled_from([torch.float32, torch.float64]),
       activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_triton_fff_matches_reference(depth, leaf, d_in, d_out, batch, dtype, activation, seed):
    torch.manual_seed(seed)
    params = fff_params(depth, d_in, leaf, d_out, dtype)
    x = torch.randn(batch, d_in, dtype=dtype)
    y = T.fff_hard(x, *params, activation)
    assert y.shape == (batch, d_out) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y, R.fff_hard(x, *params, activation), rtol=tol, atol=tol)


@settings(max_examples=15)
@given(depth=st.integers(0, 7), trees=st.integers(1, 3), d_in=st.integers(1, 200), d_out=st.integers(1, 150),
       batch=st.integers(0, 4), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_triton_neuron_tree_matches_reference(depth, trees, d_in, d_out, batch, bias, dtype, activation, seed):
    torch.manual_seed(seed)
    M = (1 << (depth + 1)) - 1
    params = [torch.randn(trees, M, d_in, dtype=dtype), torch.randn(trees, M, dtype=dtype),
              torch.randn(trees, M, d_out, dtype=dtype), torch.randn(d_out, dtype=dtype) if bias else None]
    x = torch.randn(batch, d_in, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(T.neuron_tree(x, *params, activation), R.neuron_tree(x, *params, activation),
                               rtol=tol, atol=tol)


def test_triton_non_contiguous_input():
    torch.manual_seed(0)
    params = fff_params(3, 6, 4, 5, torch.float32)
    x = torch.randn(6, 12)[:, ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(T.fff_hard(x, *params, "relu"), R.fff_hard(x, *params, "relu"), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_triton_nan_row_gives_nan_row(activation):
    """Like nn.Linear: a NaN input row gives an all-NaN output row, for every activation."""
    torch.manual_seed(2)
    params = fff_params(2, 5, 3, 4, torch.float32)
    M = 7
    tree = [torch.randn(2, M, 5), torch.randn(2, M), torch.randn(2, M, 4), torch.randn(4)]
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    for y in (T.fff_hard(x, *params, activation), T.fff_hard(x, *params, activation, True),
              T.neuron_tree(x, *tree, activation)):
        assert torch.isnan(y[1]).all(), (activation, y[1])
        assert torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("depth", [0, 3])
def test_triton_gated_fff_matches_reference(depth):
    torch.manual_seed(3)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        params = fff_params(depth, 9, 4, 6, dtype)
        x = torch.randn(7, 9, dtype=dtype)
        torch.testing.assert_close(T.fff_hard(x, *params, "gelu", True), R.fff_hard(x, *params, "gelu", True),
                                   rtol=tol, atol=tol)


def test_triton_refuses_to_drop_gradients():
    params = [p.requires_grad_() for p in fff_params(1, 3, 2, 2, torch.float32)]
    with pytest.raises(ValueError, match="computes no gradients"):
        T.fff_hard(torch.randn(2, 3), *params, "relu")
    with torch.no_grad():
        T.fff_hard(torch.randn(2, 3), *params, "relu")
