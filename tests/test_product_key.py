"""The product-key feedforward: its torch path and numba kernels against the per-row reference,
gradients, the CPU training path (numba selection and expert kernels) against the torch path,
which path runs, train/eval agreement, the selection's tie rule, the family (options,
geometry, routing), save / load and a tiny `fastff lm train --ffn product-key` run.

Comparisons on random inputs leave out the rows whose selection is within rounding of a tie
(``selection_margin``): there float32 (or another summation order) may legitimately pick other
experts. Exact ties are tested on their own, on inputs built to tie."""
from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastff
from fastff import ProductKeyFF
from fastff.apps.cli import main
from fastff.functional import ACTIVATIONS, get_activation
from fastff.kernels import cpu, gathered, product_key as PK, product_key_reference as R
from fastff.layers import families as F
from fastff.training import lm as L
from fastff.training.capacity import CapacityRecorder

from _routing import kept

NORMS = PK.QUERY_NORMS
LEADING = [(0,), (1,), (7,), (2, 3), (13,)]


def selection_margin(x, layer) -> torch.Tensor:
    """Per row (B,): the smallest float64 gap, over heads, between the k-th and (k+1)-th largest
    score of each top-k the selection makes (two sub-key sets, then the k×k candidates);
    inf where a top-k keeps everything."""
    p = {n: t.detach().double() for n, t in layer.named_parameters()}
    running = None if layer.query_norm != "batch" else (layer.running_mean.double(), layer.running_var.double())
    q = R.queries(x.detach().double(), p["w_query"], layer.query_norm, running)
    B, H, D = q.shape
    k, n = layer.top_k, layer.n_keys
    s = torch.einsum("bhtc,htnc->bhtn", q.reshape(B, H, 2, D // 2), p["sub_keys"]).sort(-1, descending=True).values
    margin = torch.full((B, H), float("inf"), dtype=torch.float64)
    if k < n:
        margin = torch.minimum(margin, (s[..., k - 1] - s[..., k]).amin(-1))
    sums = (s[:, :, 0, :k, None] + s[:, :, 1, None, :k]).reshape(B, H, k * k).sort(-1, descending=True).values
    if k * k > k:
        margin = torch.minimum(margin, sums[..., k - 1] - sums[..., k])
    return margin.amin(-1) if H else margin[:, 0]


def make_layer(i, o, n, heads, k, d, norm, dtype, activation="gelu") -> ProductKeyFF:
    layer = ProductKeyFF(i, o, n, heads=heads, top_k=k, key_dim=d, activation=activation, query_norm=norm).to(dtype)
    if norm == "batch":                        # running statistics other than the initial 0 / 1
        layer.running_mean.copy_(torch.randn(heads * d) * 0.2)
        layer.running_var.uniform_(0.5, 2.0)
    return layer


def weights(layer, dtype=None) -> tuple:
    ws = layer._weights()
    return ws if dtype is None else tuple(w.detach().to(dtype) for w in ws)


def running(layer, dtype=None):
    r = layer._running()
    return r if r is None or dtype is None else tuple(t.to(dtype) for t in r)


def close(y, ref, keep):
    y, ref = y[keep].double(), ref[keep]
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale)


shapes = st.fixed_dictionaries(dict(
    leading=st.sampled_from(LEADING), i=st.integers(1, 9), o=st.integers(1, 9), n=st.integers(2, 8),
    heads=st.integers(1, 3), k_frac=st.floats(0, 1), d=st.sampled_from([2, 4, 6, 8]), norm=st.sampled_from(NORMS),
    dtype=st.sampled_from([torch.float32, torch.float64]), activation=st.sampled_from(["gelu", "relu", "silu", "tanh"]),
    seed=st.integers(0, 2**31 - 1)))


@given(shapes)
@settings(max_examples=30)
def test_fast_paths_match_the_reference_in_eval(s):
    torch.manual_seed(s["seed"])
    k = 1 + int(s["k_frac"] * (s["n"] - 1))
    layer = make_layer(s["i"], s["o"], s["n"], s["heads"], k, s["d"], s["norm"], s["dtype"], s["activation"]).eval()
    x = torch.randn(*s["leading"], s["i"], dtype=s["dtype"])
    flat = x.reshape(-1, s["i"])
    args = (k, s["activation"], s["norm"])
    y_ref, e_ref = R.product_key(flat.double(), *weights(layer, torch.float64), *args, running(layer, torch.float64))
    tol = 1e-4 if s["dtype"] is torch.float32 else 1e-9
    keep = kept(selection_margin(flat, layer) > tol, flat.shape[0] // 2 if s["d"] >= 4 else 0)

    with torch.no_grad():
        with mock.patch.object(PK, "CHUNK_BYTES", 1):     # inference in chunks of one row
            y_t, e_t = PK.product_key(flat, *weights(layer), *args, running(layer))
        assert y_t.dtype is s["dtype"] and torch.equal(e_t[keep], e_ref[keep])
        close(y_t, y_ref, keep)
        for parallel in (False, True):                     # the serial and the parallel kernel
            with mock.patch.object(cpu, "PARALLEL_MIN_BYTES", 0 if parallel else 1 << 40):
                y_c, e_c = PK.product_key_cpu(flat, *weights(layer), *args, running(layer))
            assert y_c.dtype is s["dtype"] and torch.equal(e_c[keep], e_ref[keep])
            close(y_c, y_ref, keep)
        y = layer(x)                                       # eval without grad: the kernel, leading dims kept
    assert y.shape == (*s["leading"], s["o"]) and torch.equal(y.reshape(-1, s["o"]), y_c)
    y_grad = layer(x)                                      # eval with grad: the CPU training path
    assert y_grad.requires_grad
    close(y_grad.detach().reshape(-1, s["o"]), y_ref, keep)


@given(shapes)
@settings(max_examples=12)
def test_training_gradients_match_autograd_through_the_reference(s):
    """float64: the training forward (batch norm: batch statistics) and every gradient."""
    torch.manual_seed(s["seed"])
    k = 1 + int(s["k_frac"] * (s["n"] - 1))
    leading = s["leading"] if s["norm"] != "batch" or s["leading"][0] > 1 else (5,)
    layer = make_layer(s["i"], s["o"], s["n"], s["heads"], k, s["d"], s["norm"], torch.float64, s["activation"])
    layer.train()
    x = torch.randn(*leading, s["i"], dtype=torch.float64, requires_grad=True)
    g = torch.randn(*leading, s["o"], dtype=torch.float64)
    before = running(layer, torch.float64)
    before = None if before is None else tuple(t.clone() for t in before)

    (layer(x) * g).sum().backward()
    got = [x.grad] + [w.grad for w in layer._weights()]

    x_ref = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in layer._weights()]
    y_ref, _ = R.product_key(x_ref.reshape(-1, s["i"]), *ws, k, s["activation"], s["norm"])
    (y_ref.reshape(g.shape) * g).sum().backward()
    names = ["x", "w_query", "sub_keys", "w_in", "w_out", "b_out"]
    for name, a, b in zip(names, got, [x_ref.grad] + [w.grad for w in ws]):
        if b is None:                                      # empty batch: the reference's graph holds no weight
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)
    if s["norm"] == "batch" and x.shape[0] > 1:           # the running statistics moved towards the batch's
        q = torch.einsum("bi,hdi->bhd", x.detach().reshape(-1, s["i"]), layer.w_query.detach()).flatten(1)
        torch.testing.assert_close(layer.running_mean, 0.9 * before[0] + 0.1 * q.mean(0))


# ----------------------------------------------------------------------------- the CPU training path

train_shapes = st.fixed_dictionaries(dict(
    leading=st.sampled_from(LEADING), i=st.integers(1, 9), o=st.integers(1, 9), n=st.integers(2, 8),
    heads=st.integers(1, 3), k_frac=st.floats(0, 1), d=st.sampled_from([2, 4, 6]), norm=st.sampled_from(NORMS),
    dtype=st.sampled_from([torch.float32, torch.float64]), activation=st.sampled_from(list(ACTIVATIONS)),
    seed=st.integers(0, 2**31 - 1)))


def grads_close(got, want, dtype, names):
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None or not a.any(), name
            continue
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        if dtype is torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * scale, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * scale, msg=name)


@given(train_shapes)
@settings(max_examples=40)
def test_training_path_matches_the_torch_path(s):
    """The layer's training forward on CPU runs the numba kernels (never the torch path): the
    same experts, output and gradients of x and every weight as the torch path under autograd,
    and the same batch-norm running statistics."""
    torch.manual_seed(s["seed"])
    k = 1 + int(s["k_frac"] * (s["n"] - 1))
    dtype = s["dtype"]
    leading = s["leading"] if s["norm"] != "batch" or s["leading"][0] > 1 else (5,)
    layer = make_layer(s["i"], s["o"], s["n"], s["heads"], k, s["d"], s["norm"], dtype, s["activation"]).train()
    x = torch.randn(*leading, s["i"], dtype=dtype, requires_grad=True)
    g = torch.randn(*leading, s["o"], dtype=dtype)
    before = running(layer)
    before = None if before is None else tuple(t.clone() for t in before)

    with mock.patch.object(PK, "product_key", side_effect=AssertionError("the torch path ran")):
        y = layer(x)
    (y * g).sum().backward()
    got = [x.grad] + [w.grad for w in layer._weights()]

    x_ref = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in layer._weights()]
    run_ref = None if before is None else tuple(t.clone() for t in before)
    y_ref, e_ref = PK.product_key(x_ref.reshape(-1, s["i"]), *ws, k, s["activation"], s["norm"], run_ref, update=True)
    (y_ref.reshape(g.shape) * g).sum().backward()
    with torch.no_grad():
        run_k = None if before is None else tuple(t.clone() for t in before)
        e = PK.product_key_train_cpu(x.detach().reshape(-1, s["i"]), *layer._weights(), k, s["activation"],
                                     s["norm"], run_k, update=True)[1]
    assert torch.equal(e, e_ref)
    assert y.shape == (*leading, s["o"]) and y.dtype is dtype
    grads_close([y.detach()], [y_ref.detach().reshape(y.shape)], dtype, ["y"])
    grads_close(got, [x_ref.grad] + [w.grad for w in ws], dtype, ["x", "w_query", "sub_keys", "w_in", "w_out", "b_out"])
    if before is not None:
        for a, b in zip(running(layer), run_ref):
            torch.testing.assert_close(a, b)


@given(st.integers(0, 40), st.integers(1, 3), st.integers(1, 9), st.floats(0, 1), st.integers(1, 4),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_route_kernel_selects_like_the_torch_path(B, H, n, k_frac, levels, dtype, seed):
    """Sub-key scores from a few levels only (most scores and candidate sums tie): the same experts
    in the same order as ``select``'s stable sorts, weights = softmax of the selected scores, and
    the same gradient with respect to the scores."""
    torch.manual_seed(seed)
    k = 1 + int(k_frac * (n - 1))
    s = torch.randint(0, levels, (B, H, 2, n)).to(dtype).mul_(0.5).requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    weights, experts = PK.route_cpu(s, k)
    q = s_ref.reshape(B, H, 2 * n)           # select's einsum with identity sub-keys gives back s
    scores, e_ref = PK.select(q, torch.eye(n, dtype=dtype).expand(H, 2, n, n), k)
    assert torch.equal(experts, e_ref)
    w_ref = torch.softmax(scores, -1)
    torch.testing.assert_close(weights, w_ref)
    g = torch.randn(B, H, k, dtype=dtype)
    (weights * g).sum().backward()
    (w_ref * g).sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad)


def mix_reference(x, p, w_in, w_out, experts, activation):
    B, S = experts.shape
    h = get_activation(activation)(torch.einsum("bei,bi->be", w_in[experts], x))
    return torch.einsum("be,beo->bo", p * h, w_out[experts])


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_expert_kernel_gradcheck(activation):
    torch.manual_seed(7)
    B, I, O, N, S = 6, 5, 4, 7, 5
    x = torch.randn(B, I, dtype=torch.float64, requires_grad=True)
    p = torch.rand(B, S, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(N, I, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(N, O, dtype=torch.float64, requires_grad=True)
    experts = torch.randint(0, N, (B, S))
    experts[0] = 3                                        # one expert several times in a row
    torch.autograd.gradcheck(lambda *a: PK.experts_cpu(*a, experts, activation), (x, p, w_in, w_out))


@pytest.mark.parametrize("blocks_per_thread", [1, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_kernel_matches_autograd(blocks_per_thread, dtype):
    """Many rows per expert and experts no row selects; the weight gradients in one or many
    expert ranges."""
    torch.manual_seed(8)
    B, I, O, N, S = 301, 19, 11, 40, 6
    leaves = [torch.randn(B, I), torch.rand(B, S), torch.randn(N, I), torch.randn(N, O)]
    experts = torch.randint(0, N - 5, (B, S))
    got, want = [], []
    for run, out in ((PK.experts_cpu, got), (mix_reference, want)):
        ts = [t.to(dtype).requires_grad_() for t in leaves]
        g = torch.randn(B, O, generator=torch.Generator().manual_seed(9)).to(dtype)
        with mock.patch.object(gathered, "BLOCKS_PER_THREAD", blocks_per_thread):
            y = run(*ts, experts, "silu")
            (y * g).sum().backward()
        out.extend([y.detach()] + [t.grad for t in ts])
    grads_close(got, want, dtype, ["y", "x", "p", "w_in", "w_out"])
    assert not got[3][N - 5:].any() and not got[4][N - 5:].any()


def test_expert_kernel_on_an_empty_batch():
    w_in, w_out = torch.randn(5, 3, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    x, p = torch.randn(0, 3, requires_grad=True), torch.rand(0, 2, requires_grad=True)
    y = PK.experts_cpu(x, p, w_in, w_out, torch.zeros(0, 2, dtype=torch.long), "gelu")
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 3) and not w_in.grad.any() and not w_out.grad.any()


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_training_nan_input_stays_in_its_row(norm):
    torch.manual_seed(10)
    layer = make_layer(8, 5, 6, 2, 3, 4, norm, torch.float32).train()
    x = torch.randn(9, 8)
    y_clean = layer(x).detach()
    x[4, 2] = float("nan")
    y = layer(x.requires_grad_())
    assert y[4].isnan().all()
    rows = torch.arange(9) != 4
    torch.testing.assert_close(y[rows].detach(), y_clean[rows])


def test_training_kernels_give_the_same_results_on_any_thread_count():
    """Per row and per expert the kernels sum in one fixed order, whatever the threads."""
    torch.manual_seed(11)
    B, H, n, k, I, O = 301, 3, 9, 4, 16, 12
    s0, x0 = torch.randn(B, H, 2, n), torch.randn(B, I)
    w0 = torch.randn(n * n, I), torch.randn(n * n, O)
    g = torch.randn(B, O)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            s, x = s0.clone().requires_grad_(), x0.clone().requires_grad_()
            w_in, w_out = (w.clone().requires_grad_() for w in w0)
            p, experts = PK.route_cpu(s, k)
            y = PK.experts_cpu(x, p.reshape(B, H * k), w_in, w_out, experts.reshape(B, H * k), "gelu")
            (y * g).sum().backward()
            results.append([experts, p.detach(), y.detach(), s.grad, x.grad, w_in.grad, w_out.grad])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_which_path_runs():
    """CPU float32 / float64: eval without gradient -> the inference kernel; training or a
    gradient -> the training kernels; other dtypes -> the torch path."""
    layer = make_layer(6, 4, 4, 2, 2, 4, "layer", torch.float32)
    x = torch.randn(5, 6)
    paths = ("product_key", "product_key_cpu", "product_key_train_cpu")

    def ran(mode, grad, x):
        layer.train(mode == "train")
        spies = {name: mock.patch.object(PK, name, wraps=getattr(PK, name)) for name in paths}
        with spies["product_key"] as a, spies["product_key_cpu"] as b, spies["product_key_train_cpu"] as c, \
                torch.set_grad_enabled(grad):
            layer(x)
        return [name for name, m in zip(paths, (a, b, c)) if m.called]

    assert ran("eval", False, x) == ["product_key_cpu"]
    assert ran("eval", True, x) == ["product_key_train_cpu"]
    assert ran("train", True, x) == ["product_key_train_cpu"]
    assert ran("train", False, x) == ["product_key_train_cpu"]
    layer.to(torch.bfloat16)
    assert ran("train", True, x.bfloat16()) == ["product_key"]
    assert ran("eval", False, x.bfloat16()) == ["product_key"]


@pytest.mark.parametrize("norm", ["layer", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_and_eval_compute_the_same_function(norm, dtype):
    torch.manual_seed(1)
    layer = make_layer(12, 7, 6, 3, 4, 8, norm, dtype)
    x = torch.randn(40, 12, dtype=dtype)
    keep = kept(selection_margin(x, layer) > 1e-4, 30)
    y_train = layer.train()(x)
    layer.eval()
    y_grad = layer(x)
    with torch.no_grad():
        y_kernel = layer(x)
    close(y_grad.detach(), y_train.detach().double(), keep)
    close(y_kernel, y_train.detach().double(), keep)


def test_batch_norm_trains_on_batch_statistics_and_evaluates_on_running_ones():
    torch.manual_seed(2)
    layer = make_layer(6, 4, 4, 2, 2, 4, "batch", torch.float64)
    x = torch.randn(30, 6, dtype=torch.float64)
    y_train = layer.train()(x)
    torch.testing.assert_close(y_train, R.product_key(x, *layer._weights(), 2, "gelu", "batch")[0])
    layer.eval()
    with torch.no_grad():
        y_ref = R.product_key(x, *layer._weights(), 2, "gelu", "batch", layer._running())[0]
        torch.testing.assert_close(layer(x), y_ref)
        assert not torch.allclose(layer(x), y_train)
    with pytest.raises(ValueError, match="query_norm='batch' needs at least 2 rows"):
        layer.train()(x[:1])
    assert layer.train()(x[:0]).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_ties_go_to_the_smaller_index(dtype):
    """Built ties, equal in every implementation: with all sub-keys of a half equal every score
    ties, so the experts are 0..k-1 (sub-keys 0..k-1 of each half, then the smallest expert
    indices); with the second half's sub-keys zero the candidates of each first-half sub-key a
    tie, so the experts are a·n + 0..k-1 for the best a."""
    torch.manual_seed(3)
    n, k, H, B = 5, 3, 2, 9
    layer = make_layer(6, 4, n, H, k, 4, "layer", dtype).eval()
    x = torch.randn(B, 6, dtype=dtype)
    equal = layer.sub_keys.detach()[:, :, :1].expand_as(layer.sub_keys).clone()
    zero_half = layer.sub_keys.detach().clone()
    zero_half[:, 1] = 0
    q = PK.queries(x, layer.w_query, "layer").detach()
    best = torch.einsum("bhc,hnc->bhn", q[..., :2], zero_half[:, 0]).argmax(-1)          # (B, H)
    with torch.no_grad():
        cases = ((equal, torch.arange(k).expand(B, H, k)), (zero_half, best[..., None] * n + torch.arange(k)))
        for keys, want in cases:
            layer.sub_keys.copy_(keys)
            ws = layer._weights()
            y_ref, e_ref = R.product_key(x, *ws, k, "gelu", "layer")
            assert torch.equal(e_ref, want)
            assert torch.equal(PK.product_key(x, *ws, k, "gelu", "layer")[1], want)
            assert torch.equal(PK.product_key_cpu(x, *ws, k, "gelu", "layer")[1], want)
            assert torch.equal(PK.product_key_train_cpu(x, *ws, k, "gelu", "layer")[1], want)
            torch.testing.assert_close(layer(x), y_ref)


def test_gradients_reach_only_the_selected_experts():
    torch.manual_seed(4)
    n, k, H = 8, 2, 2
    layer = make_layer(10, 6, n, H, k, 6, "layer", torch.float64).train()
    x = torch.randn(5, 10, dtype=torch.float64)
    layer(x).square().sum().backward()
    _, experts = layer.select(x)
    used = torch.zeros(n * n, dtype=torch.bool)
    used[experts.flatten()] = True
    assert not layer.w_in.grad[~used].any() and not layer.w_out.grad[~used].any()
    assert layer.w_in.grad[used].abs().sum(1).gt(0).all() and layer.w_out.grad[used].abs().sum(1).gt(0).all()
    for h in range(H):                                     # sub-keys: only those of selected experts
        halves = experts[:, h].flatten() // n, experts[:, h].flatten() % n
        for t, keys in enumerate(halves):
            touched = torch.zeros(n, dtype=torch.bool)
            touched[keys] = True
            assert not layer.sub_keys.grad[h, t][~touched].any()
    # (a sub-key shared by all k experts of a head gets none: the softmax ignores a common shift)
    assert layer.sub_keys.grad.abs().sum() > 0 and layer.w_query.grad.abs().sum() > 0


def test_bad_options_name_what_is_allowed():
    with pytest.raises(ValueError, match="width must be a perfect square .* got 10; the nearest are 9 and 16"):
        F.make_ffn("product-key", 4, 4, 10)
    with pytest.raises(ValueError, match="product-key top_k must be <= n_keys = sqrt\\(width\\) = 4, got top_k=8"):
        F.make_ffn("product-key", 4, 4, 16)
    with pytest.raises(ValueError, match="product-key key_dim must be even"):
        F.make_ffn("product-key", 4, 4, 64, key_dim=5)
    with pytest.raises(ValueError, match="query_norm' must be one of 'layer', 'batch', 'none'; got 'group'"):
        F.make_ffn("product-key", 4, 4, 64, query_norm="group")
    with pytest.raises(ValueError, match="unknown product-key option.*'leaf'.*takes: key_heads, top_k, key_dim, "
                                         "activation, query_norm"):
        F.make_ffn("product-key", 4, 4, 64, leaf=2)
    with pytest.raises(ValueError, match="key_heads' must be >= 1"):
        F.make_ffn("product-key", 4, 4, 64, key_heads=0)
    with pytest.raises(ValueError, match="top_k must be in \\[1, 3\\], got 4"):
        ProductKeyFF(4, 4, 3, top_k=4)
    with pytest.raises(ValueError, match="key_dim must be even .* got 7"):
        ProductKeyFF(4, 4, 3, top_k=2, key_dim=7)
    with pytest.raises(ValueError, match="query_norm must be one of 'layer', 'batch', 'none'; got 'rms'"):
        ProductKeyFF(4, 4, 3, top_k=2, query_norm="rms")
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'gelu'"):
        ProductKeyFF(4, 4, 3, top_k=2, activation="swish")
    with pytest.raises(ValueError, match="ProductKeyFF expects input of shape \\(..., 4\\)"):
        ProductKeyFF(4, 4, 3, top_k=2)(torch.randn(2, 5))


@pytest.mark.parametrize("options", [{}, dict(key_heads=1, top_k=1, key_dim=2), dict(key_heads=3, top_k=5, key_dim=10,
                                                                                        query_norm="batch")])
@pytest.mark.parametrize("width", [64, 81, 256])
def test_geometry_matches_the_built_layer(options, width):
    fam = F.family("product-key")
    layer = fam.build(5, 3, width, options)
    geo = fam.geometry(width, options)
    assert (geo.training_width, geo.neurons_per_token) == (layer.training_width, layer.neurons_per_inference)
    n = round(width ** 0.5)
    o = fam.resolve(width, options)
    assert geo == F.Geometry(width, o["key_heads"] * (o["top_k"] + o["key_dim"] + n))
    assert F.family_of(layer) is fam and isinstance(layer, ProductKeyFF) and layer.experts == width


def test_routing_and_capacity_diagnostics():
    torch.manual_seed(5)
    layer = F.make_ffn("product-key", 8, 8, 36, key_heads=2, top_k=3, key_dim=4).eval()
    x = torch.randn(50, 8)
    r = F.family("product-key").routing(layer, x)
    assert r.sizes == [36] and r.logits == [None] and r.units[0].shape == (50, 6)
    assert torch.equal(r.units[0], PK.product_key_cpu(x, *layer._weights(), 3, "gelu", "layer")[1].reshape(50, 6))
    with CapacityRecorder(torch.nn.Sequential(layer)) as rec, torch.no_grad():
        layer(x)
    summary = rec.summary()[0]
    assert summary["family"] == "product-key" and summary["rows"] == 50 and 0 < summary["deepest_reached"] <= 1


@pytest.mark.parametrize("norm", NORMS)
def test_save_load_round_trip(norm, tmp_path):
    torch.manual_seed(6)
    layer = make_layer(6, 5, 4, 2, 3, 4, norm, torch.float32, "silu")
    layer.train()(torch.randn(8, 6))                       # batch norm: moves the running statistics
    layer.eval()
    fastff.save(layer, tmp_path / "pk.safetensors")
    again = fastff.load(tmp_path / "pk.safetensors")
    assert isinstance(again, ProductKeyFF) and repr(again) == repr(layer) and not again.training
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), layer.state_dict().values()))


def test_lm_train_with_product_key_feedforwards(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the king and the queen of the land, my lord\n" * 80)
    run = tmp_path / "pk"
    assert main(["lm", "train", "--text", str(text), "--ffn", "product-key", "--width", "16", "--key-heads", "2",
                 "--top-k", "2", "--key-dim", "4", "--query-norm", "batch", "--layers", "1", "--dim", "16", "--heads",
                 "2", "--context", "16", "--steps", "4", "--batch", "4", "--eval-every", "2", "--eval-batches", "1",
                 "--capacity-tokens", "64", "--quiet", "--out", str(run)]) == 0
    gpt, _, config = L.load_run(run)
    assert config["model"]["ffn"] == "product-key" and config["model"]["ffn_options"] == dict(
        key_heads=2, top_k=2, key_dim=4, activation="gelu", query_norm="batch")
    assert all(isinstance(f, ProductKeyFF) and f.n_keys == 4 for f in gpt.ffns)
    capsys.readouterr()
    assert main(["lm", "inspect", str(run), "--json"]) == 0
    capacity = json.loads(capsys.readouterr().out)["capacity"]
    assert capacity[0]["family"] == "product-key" and capacity[0]["levels"][0]["size"] == 16
    with pytest.raises(ValueError, match="product-key width must be a perfect square"):
        main(["lm", "train", "--text", str(text), "--ffn", "product-key", "--width", "20", "--quiet",
              "--out", str(tmp_path / "bad")])


def test_activation_choices_are_the_librarys():
    assert F.family("product-key").option("activation").choices == tuple(ACTIVATIONS)
