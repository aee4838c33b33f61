"""On a CUDA GPU: layers on the Triton backend against the "torch" backend (eval outputs, and the
gradients of the input and of every weight after a training forward), float32 and bfloat16, and
`fastff lm bench --device cuda`. Marked ``cuda``: skipped without a GPU (tests/conftest.py); run
them alone with ``pytest -m cuda``."""
import copy
import json

import pytest
import torch

import fastff
from fastff.apps.cli import main
from fastff.kernels import BACKENDS, routing

from _routing import kept

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
IN, OUT = 96, 80
LAYERS = {
    "neuron-tree": lambda: fastff.NeuronTree(IN, OUT, 6, trees=2),
    "neuron-tree gate route_bias": lambda: fastff.NeuronTree(IN, OUT, 6, trees=2, gate="path", route_bias=1e-3),
    "fff hard_path": lambda: fastff.FFF(IN, OUT, 5, 12, activation="gelu", train_mode="hard_path"),
}
BATCHES = (5, 300)   # eval: below and above triton.BLOCKED_FROM (the row path, then the blocked path)
BF16_TOLERANCE = 2e-2  # bfloat16 vs float32: norm of the difference / norm of the float32 result


def routes(layer, backend: str, x: torch.Tensor) -> torch.Tensor:
    """Each row's route through ``layer`` on ``backend``: (B, visited nodes) or FFF (B, 1) its leaf."""
    be = BACKENDS[backend]
    with torch.no_grad():
        if isinstance(layer, fastff.NeuronTree):
            return be.neuron_tree_paths(x, layer.w_in, layer.b_in, layer.w_out, layer.b_out, layer.activation,
                                        **layer.routed_options())[1].flatten(1)
        leaf = routing.fff_hard_path(be.fff_walk, be.fff_leaves, x, layer.node_w, layer.node_b, layer.w1, layer.b1,
                                     layer.w2, layer.b2, layer.activation, hardened=layer.train_hardened)[2]
        return leaf[:, None]


def twins(make, dtype: torch.dtype):
    """(layer in ``dtype`` on "triton", its float32 copy on "torch": the same, rounded, weights)."""
    torch.manual_seed(0)
    layer = make().to(DEVICE, dtype)
    ref = copy.deepcopy(layer).float()
    layer.backend, ref.backend = "triton", "torch"
    return layer, ref


def same_routes(layer, ref, x: torch.Tensor) -> torch.Tensor:
    """Rows (B,) bool that both twins route alike (a pre-activation within rounding of 0 may not)."""
    return kept((routes(layer, "triton", x) == routes(ref, "torch", x.float())).all(1), len(x) - 2)


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """float32: elementwise within 1e-4; bfloat16: within BF16_TOLERANCE of the norm of the float32 ``b``."""
    assert a.dtype == dtype, what
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=what)
    else:
        assert torch.linalg.norm(a.float() - b) <= BF16_TOLERANCE * torch.linalg.norm(b), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS)
def test_triton_eval_equals_torch(make, dtype):
    layer, ref = twins(make, dtype)
    layer.eval(), ref.eval()
    for batch in BATCHES:
        x = torch.randn(batch, IN, device=DEVICE).to(dtype)
        same = same_routes(layer, ref, x)
        with torch.inference_mode():
            y, y_ref = layer(x), ref(x.float())
        assert_close(y[same], y_ref[same], dtype, f"eval output, batch {batch}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS)
def test_triton_training_gradients_equal_torch(make, dtype):
    """A training forward and ``loss.backward()``: the loss weighs only rows routed alike, so every
    gradient (input and weights) compares the same rows."""
    layer, ref = twins(make, dtype)
    layer.train(), ref.train()
    x = torch.randn(300, IN, device=DEVICE).to(dtype).requires_grad_()
    x_ref = x.detach().float().requires_grad_()
    g = torch.randn(300, OUT, device=DEVICE)
    g[~same_routes(layer, ref, x.detach())] = 0
    (layer(x).float() * g).sum().backward()
    (ref(x_ref) * g).sum().backward()
    assert_close(x.grad, x_ref.grad, dtype, "input gradient")
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, dtype, f"{name} gradient")


def test_lm_bench_runs_on_cuda(capsys):
    tiny = ["lm", "bench", "--layers", "1", "--dim", "32", "--heads", "2", "--context", "24", "--depth", "3",
            "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1", "--batches", "1,2", "--device", DEVICE,
            "--json"]
    assert main([*tiny, "--ffns", "dense,dense-int8,neuron-tree,fff,moe,no-ffn"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert {r["ffn"] for r in rows} == {"dense", "neuron-tree", "fff", "moe", "no-ffn"}
    assert {r["phase"] for r in rows} == {"prefill", "generate"}
    assert all(r["device"] == DEVICE and r["ms"] > 0 for r in rows)
    assert "skipping dense-int8: int8 (torch.ao quantize_dynamic) runs on CPU only" in out.err
    assert main([*tiny, "--train", "--ffns", "dense,neuron-tree,fff"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["phase"] for r in rows} == {"train"} and {r["ffn"] for r in rows} == {"dense", "neuron-tree", "fff"}
    with pytest.raises(ValueError, match="the int8 variants run on CPU only"):
        main([*tiny, "--ffns", "dense-int8,neuron-tree-int8"])


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS)
def test_auto_runs_cuda_eval_and_training_on_triton(make, monkeypatch):
    """Backend "auto" (the default) sends CUDA tensors to the Triton kernels, in eval and in training."""
    from fastff import kernels

    calls = []
    for op in ("fff_hard", "neuron_tree", "neuron_tree_paths", "fff_walk"):
        original = getattr(BACKENDS["triton"], op)
        monkeypatch.setattr(kernels.triton, op, lambda *a, _op=op, _f=original, **k: calls.append(_op) or _f(*a, **k),
                            raising=False)
    torch.manual_seed(0)
    layer = make().to(DEVICE)
    x = torch.randn(300, IN, device=DEVICE)
    layer.train()(x).sum().backward()
    trained = list(calls)
    with torch.inference_mode():
        layer.eval()(x)
    assert trained and set(trained) <= {"neuron_tree_paths", "fff_walk"}
    assert set(calls[len(trained):]) & {"fff_hard", "neuron_tree"}
