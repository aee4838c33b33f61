"""The numba CPU kernels (backend "cpu") against the per-row reference walks."""
from contextlib import ExitStack
from unittest import mock

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import fastff
from fastff import kernels
from fastff.functional import ACTIVATIONS
from fastff.kernels import cpu, reference as R
from fastff.kernels.numba import common, infer
from fastff.threads import set_threads

from _routing import kept, route_margin

# (THROUGHPUT_MIN_ROWS, PARALLEL_MIN_BYTES, SUBTREE_BYTES, GEMM_MIN_LEAF, TILE_BYTES) forcing each
# code path whatever the batch size; the grouped descent then regroups rows on the deepest
# possible level, "throughput" in tiles of 4 rows; "throughput" runs FFF leaves with the
# hand-written tile loops, "gemm" with BLAS GEMMs.
PATHS = {"serial": (1 << 40, 1 << 40, 1 << 19, 1 << 40, 3 << 18), "parallel": (1 << 40, 0, 1 << 19, 1 << 40, 3 << 18),
         "throughput": (0, 0, 0, 1 << 40, 1), "gemm": (0, 0, 0, 1, 3 << 18)}
LEADING = [(0,), (1,), (7,), (2, 3, 5), (40,)]


def forced_path(path: str) -> ExitStack:
    stack = ExitStack()
    for name, value in zip(("THROUGHPUT_MIN_ROWS", "PARALLEL_MIN_BYTES", "SUBTREE_BYTES", "GEMM_MIN_LEAF", "TILE_BYTES"),
                           PATHS[path]):
        stack.enter_context(mock.patch.object(cpu, name, value))
    return stack


def fff_params(f):
    return f.node_w, f.node_b, f.w1, f.b1, f.w2, f.b2


def nt_params(n):
    return n.w_in, n.b_in, n.w_out, n.b_out


def assert_matches(y, ref, keep=None, at_least=0):
    """y == ref within 1e-5 relative (to the output scale) on the rows in ``keep`` (None: all),
    which must keep at least ``at_least`` rows."""
    if keep is not None:
        keep = kept(keep, at_least)
        y, ref = y[keep], ref[keep]
    y = y.double()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale)


def make_input(shape, d_in, dtype, contiguous):
    """x of shape (*shape, d_in); a strided view when not ``contiguous``."""
    if contiguous:
        return torch.randn(*shape, d_in, dtype=dtype)
    return torch.randn(*shape, 2 * d_in, dtype=dtype)[..., ::2]


@given(depth=st.integers(0, 7), leaf=st.integers(1, 20), d_in=st.integers(1, 24), d_out=st.integers(1, 9),
       shape=st.sampled_from(LEADING), dtype=st.sampled_from([torch.float32, torch.float64]),
       activation=st.sampled_from(sorted(ACTIVATIONS)), contiguous=st.booleans(),
       path=st.sampled_from(sorted(PATHS)), gated=st.booleans(), seed=st.integers(0, 2**16))
def test_fff_cpu_matches_reference(depth, leaf, d_in, d_out, shape, dtype, activation, contiguous, path, gated, seed):
    torch.manual_seed(seed)
    f = fastff.FFF(d_in, d_out, depth, leaf, activation=activation, backend="cpu",
                   train_mode="hard_path" if gated else "soft").to(dtype).eval()
    assert f.gated == gated
    x = make_input(shape, d_in, dtype, contiguous)
    with torch.no_grad(), forced_path(path):
        y = f(x)
    x2 = x.reshape(-1, d_in)
    ref = R.fff_hard(x2.double(), *(p.detach().double() for p in fff_params(f)), activation, gated)
    assert y.shape == (*shape, d_out) and y.dtype == dtype
    keep = route_margin(x2, f.node_w, f.node_b, depth) > 1e-4
    assert_matches(y.reshape(-1, d_out), ref, keep, at_least=len(x2) // 2)


@given(depth=st.integers(0, 6), trees=st.integers(1, 3), d_in=st.integers(1, 24), d_out=st.integers(1, 9),
       shape=st.sampled_from(LEADING), dtype=st.sampled_from([torch.float32, torch.float64]),
       activation=st.sampled_from(sorted(ACTIVATIONS)), bias=st.booleans(), contiguous=st.booleans(),
       path=st.sampled_from(sorted(PATHS)), seed=st.integers(0, 2**16))
def test_neuron_tree_cpu_matches_reference(depth, trees, d_in, d_out, shape, dtype, activation, bias, contiguous,
                                           path, seed):
    torch.manual_seed(seed)
    n = fastff.NeuronTree(d_in, d_out, depth, trees, activation=activation, bias=bias, backend="cpu")
    n = n.to(dtype).eval()
    x = make_input(shape, d_in, dtype, contiguous)
    with torch.no_grad(), forced_path(path):
        y = n(x)
    x2 = x.reshape(-1, d_in)
    params = [None if p is None else p.detach().double() for p in nt_params(n)]
    ref = R.neuron_tree(x2.double(), *params, activation)
    assert y.shape == (*shape, d_out) and y.dtype == dtype
    keep = torch.stack([route_margin(x2, n.w_in[k], n.b_in[k], depth + 1) for k in range(trees)]).amin(0) > 1e-4
    assert_matches(y.reshape(-1, d_out), ref, keep, at_least=len(x2) // 2)


@given(depth=st.integers(0, 6), trees=st.integers(1, 3), rows=st.integers(0, 50), tile=st.integers(4, 20),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_grouped_descent_equals_walk_at_every_split(depth, trees, rows, tile, dtype, seed):
    """Grouping rows on any level, in tiles of any size, gives the per-row walk's visited nodes
    and (up to reassociation) its outputs."""
    torch.manual_seed(seed)
    n = fastff.NeuronTree(12, 5, depth, trees).to(dtype)
    x = torch.randn(rows, 12, dtype=dtype).numpy()
    w_in, b_in, w_out, b_out = (p.detach().numpy() for p in nt_params(n))
    walk = np.empty((rows, 5), x.dtype)
    infer.nt_serial(x, w_in, b_in, w_out, b_out, np.zeros((0, 0), x.dtype), False, depth + 1, 1, walk)
    visits = R.neuron_tree_visits(torch.from_numpy(x), n.w_in.detach(), n.b_in.detach()).numpy()
    keep = (torch.stack([route_margin(torch.from_numpy(x), n.w_in[k], n.b_in[k], depth + 1) for k in range(trees)])
            .amin(0) > 1e-4).numpy() if rows else np.zeros(0, bool)
    keep = kept(keep, rows // 2)
    for split in range(depth + 1):
        pre, nodes = np.empty((rows, trees, depth + 1), x.dtype), np.empty((rows, trees, depth + 1), np.int64)
        order, tiles = common.route(x, w_in, b_in, np.zeros((0, trees, depth + 1), np.uint8), split, tile, pre, nodes)
        assert sorted(order.tolist()) == list(range(rows)) and (tiles[:, 2] - tiles[:, 1] <= tile).all()
        out = np.empty((rows, 5), x.dtype)
        infer.nt_outputs(pre, nodes, w_out, b_out, 1, order, tiles, out)
        assert (nodes[keep] == visits[keep]).all()
        np.testing.assert_allclose(out[keep], walk[keep], rtol=1e-4, atol=1e-5)


def test_nt_split():
    assert cpu.nt_split(12, 6144) == 6          # 1x11 at dim 768: 63-neuron subtrees, 378 KB
    assert cpu.nt_split(4, 6144) == 0           # the whole tree fits
    assert cpu.nt_split(1, 6144) == 0


@pytest.mark.parametrize("layer", ["fff", "neuron-tree"])
def test_depth_15(layer):
    torch.manual_seed(0)
    x = torch.randn(200, 4)
    with torch.no_grad():
        if layer == "fff":
            m = fastff.FFF(4, 3, 15, 2, backend="cpu").eval()
            ref = R.fff_hard(x.double(), *(p.double() for p in fff_params(m)), m.activation)
            keep = route_margin(x, m.node_w, m.node_b, 15) > 1e-4
        else:
            m = fastff.NeuronTree(4, 3, 15, backend="cpu").eval()
            ref = R.neuron_tree(x.double(), *(p.double() for p in nt_params(m)), m.activation)
            keep = route_margin(x, m.w_in[0], m.b_in[0], 16) > 1e-4
        assert_matches(m(x), ref, keep, at_least=190)


@pytest.mark.parametrize("path", ["parallel", "throughput", "gemm"])
def test_same_result_with_one_and_two_threads(path):
    torch.manual_seed(1)
    f = fastff.FFF(32, 8, 5, 16, backend="cpu").eval()
    n = fastff.NeuronTree(32, 8, 6, 2, backend="cpu").eval()
    x = torch.randn(300, 32)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            set_threads(threads)         # the kernels follow torch's thread count
            with torch.no_grad(), forced_path(path):
                outs.append((f(x), n(x)))
            assert numba.get_num_threads() == threads
    finally:
        set_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_non_cpu_tensor_is_a_clear_error():
    x = torch.empty(2, 4, device="meta")
    with pytest.raises(ValueError, match="CPU tensors only.*meta"):
        cpu.check_tensors(x)
    n = fastff.NeuronTree(4, 3, 2).eval()
    with pytest.raises(ValueError, match="CPU tensors only"):
        cpu.neuron_tree(x, *nt_params(n), "gelu")
    with pytest.raises(ValueError, match="CPU tensors only"):
        cpu.check_tensors(torch.zeros(1), mock.Mock(device=torch.device("cuda", 0), is_cpu=False,
                                                          dtype=torch.float32))


def test_bad_dtype_and_activation_are_clear_errors():
    n = fastff.NeuronTree(4, 3, 2).eval()
    with pytest.raises(TypeError, match="float32 and float64"):
        cpu.neuron_tree(torch.zeros(2, 4, dtype=torch.float16), *(p.half() for p in nt_params(n)), "gelu")
    with pytest.raises(TypeError, match="one dtype"):
        cpu.neuron_tree(torch.zeros(2, 4, dtype=torch.float64), *nt_params(n), "gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        cpu.neuron_tree(torch.zeros(2, 4), *nt_params(n), "swish")


def test_weight_updates_are_seen():
    """The cached numpy views follow in-place updates and replaced parameter data."""
    torch.manual_seed(2)
    f = fastff.FFF(6, 3, 2, 4, backend="cpu").eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        f(x)
        f.b2.add_(1.0)
        assert_matches(f(x), R.fff_hard(x.double(), *(p.double() for p in fff_params(f)), f.activation))
        f.w2.data = torch.randn_like(f.w2)
        assert_matches(f(x), R.fff_hard(x.double(), *(p.double() for p in fff_params(f)), f.activation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_uses_cpu_kernels_for_inference_only(dtype):
    f = fastff.FFF(8, 3, 3, 4).to(dtype).eval()
    n = fastff.NeuronTree(8, 3, 3).to(dtype).eval()
    x = torch.randn(4, 8, dtype=dtype)
    with mock.patch.object(cpu.Prepared, "__call__", autospec=True, side_effect=cpu.Prepared.__call__) as run:
        with torch.no_grad():
            f(x), n(x)
        assert run.call_count == 2
        y = f(x)          # grad mode and trainable parameters: the differentiable cpu training kernels
        z = n(x)
        assert run.call_count == 2
        assert y.requires_grad and z.requires_grad
    assert kernels.resolve(None) is kernels.AUTO and kernels.resolve("cpu") is cpu


def test_layers_reach_the_prepared_path_through_the_dispatcher():
    """The eval fast path is the resolved backend's ``prepare``: offered by "cpu" and "auto",
    prepared once per backend and weights, never used on a backend without one."""
    torch.manual_seed(5)
    layer = fastff.NeuronTree(6, 3, 2).eval()
    x = torch.randn(1, 6)
    ref = R.neuron_tree(x.double(), *(p.detach().double() for p in nt_params(layer)), layer.activation)
    steps = [(None, 1, 1), (None, 1, 2), ("cpu", 2, 3), ("torch", 2, 3), ("reference", 2, 3), ("cpu", 3, 4)]
    with (torch.no_grad(), mock.patch.object(cpu, "prepare", wraps=cpu.prepare) as prepare,
          mock.patch.object(cpu.Prepared, "__call__", autospec=True, side_effect=cpu.Prepared.__call__) as run):
        for backend, prepares, runs in steps:
            layer.backend = backend
            y = layer(x)
            assert (prepare.call_count, run.call_count) == (prepares, runs), backend
            assert_matches(y, ref)
        with kernels.forced_backend("torch"):
            layer(x)
        assert (prepare.call_count, run.call_count) == (3, 4)


def test_auto_falls_back_to_torch_off_cpu_dtypes():
    assert not kernels.cpu_applies(torch.zeros(2, dtype=torch.bfloat16))
    assert not kernels.cpu_applies(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not kernels.cpu_applies(torch.empty(2, device="meta"))
    assert kernels.cpu_applies(torch.zeros(2), None)


def test_export_and_compile_see_one_op():
    torch.manual_seed(3)
    f = fastff.FFF(8, 3, 3, 4).eval()
    n = fastff.NeuronTree(8, 3, 3, 2).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        for m, op in ((f, torch.ops.fastff.fff_hard.default), (n, torch.ops.fastff.neuron_tree_hard.default)):
            ep = torch.export.export(m, (x,))
            targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
            assert targets.count(op) == 1
            torch.testing.assert_close(ep.module()(x), m(x), rtol=0, atol=0)
        seen = []

        def backend(gm, inputs):
            seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
            return gm.forward

        y = torch.compile(n, backend=backend, fullgraph=True)(x)
        assert torch.ops.fastff.neuron_tree_hard.default in seen or torch.ops.fastff.neuron_tree_hard in seen
        torch.testing.assert_close(y, n(x), rtol=0, atol=0)


def test_custom_op_matches_eager():
    torch.manual_seed(4)
    f = fastff.FFF(8, 3, 3, 4).eval()
    x = torch.randn(6, 8)
    with torch.no_grad():
        for gated in (False, True):
            torch.testing.assert_close(torch.ops.fastff.fff_hard(x, *fff_params(f), "relu", gated),
                                       cpu.fff_hard(x, *fff_params(f), "relu", gated), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fastff.fff_hard.default,
                          (x, *(p.detach() for p in fff_params(f)), "relu", True),
                          test_utils=("test_schema", "test_faketensor"))


def test_kernels_follow_and_keep_torch_thread_count():
    """numba shares libgomp with torch: the kernels must neither ignore nor change torch's count."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                fastff.FFF(64, 8, 4, 16).eval()(torch.randn(600, 64))
                assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
                fastff.NeuronTree(64, 8, 6).eval()(torch.randn(600, 64))
            fastff.NeuronTree(64, 8, 6).train()(torch.randn(600, 64)).sum().backward()
            fastff.FFF(64, 8, 4, 16, train_mode="hard_path").train()(torch.randn(600, 64)).sum().backward()
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_single_threaded_blas_covers_every_loaded_blas():
    """The leaf GEMMs of hard_path training call scipy's BLAS from numba prange loops; the limit
    must reach that library, which is loaded lazily (after fastff's import)."""
    import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba's np.dot calls)
    from threadpoolctl import ThreadpoolController

    from fastff.threads import single_threaded_blas

    loaded = {i["filepath"] for i in ThreadpoolController().info() if i["user_api"] == "blas"}
    with single_threaded_blas():
        inside = {i["filepath"]: i["num_threads"] for i in ThreadpoolController().info() if i["user_api"] == "blas"}
    assert loaded and set(inside) >= loaded
    assert all(n == 1 for n in inside.values())


@pytest.mark.parametrize("make", [lambda: fastff.FFF(8, 3, 3, 4), lambda: fastff.FFF(8, 3, 3, 4, train_mode="hard_path"),
                                  lambda: fastff.NeuronTree(8, 3, 3, 2)])
def test_cpu_backend_under_autograd_gives_the_gradients_of_the_torch_backend(make):
    """Eval with backend="cpu" while autograd is on runs the conditional training kernels: the
    layer and everything upstream get the same gradients as on the differentiable torch path."""
    torch.manual_seed(6)
    layer = make().double().eval()
    x = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for backend in ("cpu", "torch"):
        layer.backend = backend
        layer.zero_grad()
        x.grad = None
        layer(x).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 1
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["fff", "neuron-tree"])
def test_prepared_eval_path_follows_layer_changes(kind):
    """The layers' prepared eval call re-prepares after load_state_dict, an activation change and a
    dtype change, and takes leading batch dims and non-contiguous inputs."""
    torch.manual_seed(3)
    make = (lambda: fastff.FFF(6, 5, 2, 3)) if kind == "fff" else (lambda: fastff.NeuronTree(6, 5, 2))
    layer, other = make().eval(), make().eval()
    x = torch.randn(4, 3, 6)

    def expected(m, x):
        params = fff_params(m) if kind == "fff" else nt_params(m)
        ref = R.fff_hard if kind == "fff" else R.neuron_tree
        y = ref(x.reshape(-1, 6).double(), *(None if p is None else p.double() for p in params), m.activation)
        return y.reshape(*x.shape[:-1], 5)

    with torch.inference_mode():
        assert torch.allclose(layer(x).double(), expected(layer, x), atol=1e-5)
        layer.load_state_dict(other.state_dict())
        assert torch.allclose(layer(x).double(), expected(other, x), atol=1e-5)
        layer.activation = "relu"
        assert torch.allclose(layer(x).double(), expected(layer, x), atol=1e-5)
        xt = torch.randn(6, 7).t()                       # (7, 6), not contiguous
        assert torch.allclose(layer(xt).double(), expected(layer, xt), atol=1e-5)
        layer.double()
        y = layer(x.double())
        assert y.dtype == torch.float64 and torch.allclose(y, expected(layer, x), atol=1e-10)
