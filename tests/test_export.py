"""torch.export / ONNX export of eval-mode FFF and NeuronTree, checked under onnxruntime."""
import pytest
import torch

import fastff
from fastff import kernels
from fastff.apps.onnx_bench import onnx_bench_rows
from fastff.export import export_onnx, export_program, onnx_session

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

LAYERS = [lambda: fastff.FFF(12, 5, 3, 4, master_leaf="token", backend="cpu"),
          lambda: fastff.NeuronTree(12, 5, 3, trees=2, bias=False, activation="gelu")]


@pytest.fixture(params=LAYERS, ids=["fff", "neuron_tree"])
def layer(request):
    torch.manual_seed(0)
    return request.param().eval()


def _unchanged_after(layer, fn):
    backend, default = layer.backend, kernels.get_backend()
    out = fn()
    assert (layer.backend, kernels.get_backend(), kernels.resolve(layer.backend)) == (
        backend, default, kernels.resolve(backend))
    return out


def test_torch_export_matches_eager(layer):
    program = _unchanged_after(layer, lambda: export_program(layer))
    run = program.module()
    for batch in (1, 64):
        x = torch.randn(batch, 12)
        torch.testing.assert_close(run(x), layer(x), rtol=0, atol=1e-5)


def test_onnx_matches_pytorch_and_routes_by_gathers(layer, tmp_path):
    import onnx

    path = _unchanged_after(layer, lambda: export_onnx(layer, tmp_path / "layer.onnx"))
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert ops & {"Gather", "GatherND", "GatherElements"}, ops
    session = onnx_session(path)
    for batch in (1, 64):
        x = torch.randn(batch, 12)
        (y,) = session.run(None, {"x": x.numpy()})
        assert y.shape == (batch, 5)
        torch.testing.assert_close(torch.from_numpy(y), layer(x), rtol=0, atol=1e-5)


def test_export_refuses_training_mode():
    layer = fastff.FFF(4, 2, 1, 2)
    with pytest.raises(ValueError, match=r"eval-mode model \(call model.eval\(\)\); in training mode: \['FFF'"):
        export_program(layer)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_program("layer", torch.randn(2, 4))
    assert layer.backend is None


def test_onnx_bench_rows(tmp_path):
    rows = onnx_bench_rows({"layer": "FFF", "in_features": 16, "out_features": 8, "depth": 3, "leaf_width": 2},
                           [1, 8], repeats=3, tmpdir=str(tmp_path), rows_per_call=5)
    assert [r["batch"] for r in rows] == [1, 8]
    assert [r["onnx_rows_per_call"] for r in rows] == [1, 5]
    for r in rows:
        assert set(r) == {"layer", "batch", "depth", "backend", "ms", "dense_ms", "speedup_vs_dense",
                          "fastff_ms", "fastff_backend", "onnx_rows_per_call"}
        assert r["backend"] == "onnxruntime" and r["depth"] == 3 and r["layer"].startswith("FFF(")
        assert r["ms"] > 0 and r["dense_ms"] > 0 and r["fastff_ms"] > 0 and r["fastff_backend"] == "auto"
        assert r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["ms"])
    with pytest.raises(ValueError, match="batches"):
        onnx_bench_rows(fastff.FFF(4, 2, 1, 2), [0])
    with pytest.raises(ValueError, match="unknown layer"):
        onnx_bench_rows({"layer": "Conv"}, [1])


def test_model_with_fastff_layers_exports_with_leading_dims():
    """A whole model (3-D input, dim 0 dynamic); check_finite is skipped while tracing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), fastff.FFF(8, 8, 2, 3), torch.nn.ReLU(),
                                fastff.NeuronTree(8, 4, 2)).eval()
    model[1].check_finite = True
    run = export_program(model, torch.randn(2, 3, 6)).module()
    for batch in (1, 5):
        x = torch.randn(batch, 3, 6)
        torch.testing.assert_close(run(x), model(x), rtol=0, atol=1e-5)
