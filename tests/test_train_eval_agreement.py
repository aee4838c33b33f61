"""A layer computes one function: an FFF trained on hard routes (hard_path, train_hardened) and a
NeuronTree give in eval mode what their training forward gives (without the training noise),
on every backend, under torch.export and in ONNX."""
import os

import pytest
import torch

import fastff

from _routing import kept, route_margin

F64 = torch.float64
HARD_ROUTED = {
    "fff_hard_path": lambda: fastff.FFF(16, 8, depth=3, leaf_width=4, train_mode="hard_path"),
    "fff_hard_path_master": lambda: fastff.FFF(16, 8, depth=4, leaf_width=3, train_mode="hard_path",
                                               master_leaf="token", activation="gelu"),
    "fff_hard_path_hardened": lambda: fastff.FFF(16, 8, depth=3, leaf_width=4, train_mode="hard_path",
                                                 train_hardened=True),
    "fff_soft_hardened": lambda: fastff.FFF(16, 8, depth=3, leaf_width=4, train_hardened=True),
    "neuron_tree": lambda: fastff.NeuronTree(16, 8, depth=4, trees=2),
}


def train_and_eval_outputs(layer, x, backend):
    layer.backend = backend
    with torch.no_grad():
        train = layer.train()(x)
        return train, layer.eval()(x)


@pytest.mark.parametrize("name", sorted(HARD_ROUTED))
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "auto"])
def test_eval_equals_training_forward(name, backend):
    torch.manual_seed(0)
    layer = HARD_ROUTED[name]().to(F64)
    x = torch.randn(64, 2, 16, dtype=F64)
    train, evaluated = train_and_eval_outputs(layer, x, backend)
    torch.testing.assert_close(evaluated, train, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_eval_gradients_equal_training_gradients(backend):
    """Eval under autograd differentiates the same function (gate included) as training."""
    torch.manual_seed(1)
    layer = HARD_ROUTED["fff_hard_path_master"]().to(F64)
    layer.backend = backend
    x = torch.randn(40, 16, dtype=F64)
    grads = []
    for mode in (True, False):
        layer.zero_grad()
        layer.train(mode)(x).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float32_eval_agrees_with_training_off_the_boundaries():
    torch.manual_seed(2)
    layer = HARD_ROUTED["fff_hard_path"]()
    x = torch.randn(500, 16)
    train, evaluated = train_and_eval_outputs(layer, x, None)
    keep = kept(route_margin(x, layer.node_w, layer.node_b, layer.depth) > 1e-4, 490)
    torch.testing.assert_close(evaluated[keep], train[keep], rtol=1e-5, atol=1e-6)


def test_export_computes_the_gated_function(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fastff.export import export_onnx, export_program, onnx_session

    torch.manual_seed(3)
    layer = HARD_ROUTED["fff_hard_path_master"]()
    x = torch.randn(32, 16)
    with torch.no_grad():
        train = layer.train()(x)
        layer.eval()
        keep = kept(route_margin(x, layer.node_w, layer.node_b, layer.depth) > 1e-4, 30)
        torch.testing.assert_close(export_program(layer).module()(x)[keep], train[keep], rtol=1e-5, atol=1e-5)
        (y,) = onnx_session(export_onnx(layer, tmp_path / "fff.onnx")).run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y)[keep], train[keep], rtol=1e-5, atol=1e-5)


def test_triton_interpreter_computes_the_gated_function():
    """In a fresh process: the interpreter must be switched on before Triton is imported."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    code = ("import torch, fastff\n"
            "torch.manual_seed(0)\n"
            "f = fastff.FFF(16, 8, 3, 4, train_mode='hard_path').double()\n"
            "x = torch.randn(20, 16, dtype=torch.float64)\n"
            "with torch.no_grad():\n"
            "    t = f.train()(x)\n"
            "    f.backend = 'triton'\n"
            "    e = f.eval()(x)\n"
            "assert (t - e).abs().max() < 1e-10, (t - e).abs().max()\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
