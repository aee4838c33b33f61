"""``torch.export`` and ONNX export of eval-mode models with FFF / NeuronTree layers, and the
ONNX Runtime timing rows of ``fastff bench --onnx``.

Export traces the ``"torch"`` backend (hard routing as gathers: per level one ``GatherND`` of
the current node's weights, a dot product and a ``>= 0`` comparison; then a gather of the
reached leaf), whatever backend the layers use otherwise. The batch dimension (dim 0 of the
input) is dynamic. ``MoE`` is not exportable (its expert grouping is data-dependent Python).
Needs ``pip install onnx onnxruntime onnxscript`` for the ONNX parts.
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time

import torch
from torch import nn

from . import kernels
from ._checks import check_int
from .io import _registry
from .kernels import vectorized
from .layers._base import RoutedLayer


def _example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
        return example
    if not hasattr(model, "in_features"):
        raise ValueError(f"pass an example input for a {type(model).__name__} (it has no in_features)")
    p = next(model.parameters())
    return torch.randn(2, model.in_features, dtype=p.dtype, device=p.device)


@contextlib.contextmanager
def _exportable(model: nn.Module):
    """While tracing: every layer on the "torch" backend, rows in one chunk (so the batch size
    stays symbolic). Restores both afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"export needs an eval-mode model (call model.eval()); in training mode: {training}")
    layers = [m for m in model.modules() if isinstance(m, RoutedLayer) and hasattr(m, "backend")]
    saved = [m.backend for m in layers]
    chunk, default = vectorized.CHUNK_BYTES, kernels.get_backend()
    try:
        for m in layers:
            m.backend = "torch"
        vectorized.CHUNK_BYTES = 1 << 62
        kernels.set_backend("torch")
        yield
    finally:
        for m, b in zip(layers, saved):
            m.backend = b
        vectorized.CHUNK_BYTES = chunk
        kernels.set_backend(default)


def export_program(model: nn.Module, example: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` an eval-mode model. example: an input (B, ..., in_features); default
    ``randn(2, in_features)``. Dim 0 is dynamic in the program."""
    x = _example(model, example)
    with _exportable(model):
        return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor | None = None) -> str:
    """Write an eval-mode model as ONNX to ``path`` (input "x", output (B, ..., out_features),
    dynamic batch dim). Returns the path."""
    x = _example(model, example)
    path = os.fspath(path)
    with _exportable(model):
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), optimize=True, verbose=False)
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on CPU with ``threads`` intra-op threads (default:
    ``torch.get_num_threads()``, so it is timed on the same cores as PyTorch)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _median_ms(fns, repeats: int) -> list[float]:
    """Median wall time (ms) of each function; the functions are run interleaved (one call of
    each per round) so background load hits them alike. Two warm-up rounds are not timed."""
    times = [[] for _ in fns]
    for r in range(repeats + 2):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            if r >= 2:
                ts.append(time.perf_counter() - t)
    return [1e3 * statistics.median(ts) for ts in times]


def _layer(spec) -> nn.Module:
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)          # benchmarking must not change the caller's layer
    if isinstance(spec, dict) and isinstance(spec.get("layer"), str):
        cls = _registry().get(spec["layer"])
        if cls is None:
            raise ValueError(f"unknown layer {spec['layer']!r}; known: {sorted(_registry())}")
        return cls(**{k: v for k, v in spec.items() if k != "layer"})
    raise TypeError("layer_spec_or_layer must be an FFF / NeuronTree module or a dict "
                    "{'layer': 'FFF', <constructor arguments>}, got " f"{type(spec).__name__}")


def onnx_bench_rows(layer_spec_or_layer, batches, repeats: int = 20, tmpdir: str | None = None,
                    rows_per_call: int = 1024) -> list[dict]:
    """Time the ONNX graph of one layer under onnxruntime against a PyTorch ``DenseFF`` of the
    same training width (``hidden = layer.training_width``, same in/out/activation), both on
    float32 CPU inputs of each batch size, measured in this call.

    layer_spec_or_layer: an FFF / NeuronTree layer, or ``{"layer": "FFF", ...kwargs}``.
    The graph gathers every row's weights (an FFF leaf's ``in x leaf_width`` block per row), so
    larger batches are fed to onnxruntime in consecutive slices of ``rows_per_call`` rows
    (the timing covers all slices), like the chunking of the ``"torch"`` backend.
    Returns one dict per batch: layer, batch, depth, backend ("onnxruntime"), ms (median per
    forward), dense_ms, speedup_vs_dense (= dense_ms / ms), and for comparison fastff_ms: the
    same layer in PyTorch on its own backend (fastff_backend). All three are timed interleaved.
    """
    import tempfile

    from .layers import DenseFF

    layer = _layer(layer_spec_or_layer).float().eval()
    if not hasattr(layer, "depth") or not hasattr(layer, "training_width"):
        raise ValueError(f"onnx_bench_rows times FFF / NeuronTree layers, got {type(layer).__name__}")
    rows_per_call = check_int("rows_per_call", rows_per_call, 1)
    batches = list(batches)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batches must be a non-empty list of integers >= 1, got {batches!r}")
    dense = DenseFF(layer.in_features, layer.out_features, layer.training_width, layer.activation).eval()
    name = f"{type(layer).__name__}({layer.extra_repr()})"
    with tempfile.TemporaryDirectory(dir=tmpdir) as d:
        session = onnx_session(export_onnx(layer, os.path.join(d, "layer.onnx")))
        rows = []
        for b in batches:
            x = torch.randn(b, layer.in_features)
            feeds = [{"x": part.numpy()} for part in x.split(rows_per_call)]
            with torch.inference_mode():
                ms, dense_ms, own_ms = _median_ms(
                    [lambda: [session.run(None, f) for f in feeds], lambda: dense(x), lambda: layer(x)], repeats)
            rows.append({"layer": name, "batch": b, "depth": layer.depth, "backend": "onnxruntime",
                         "ms": ms, "dense_ms": dense_ms, "speedup_vs_dense": dense_ms / ms,
                         "fastff_ms": own_ms, "fastff_backend": layer.backend or kernels.get_backend(),
                         "onnx_rows_per_call": min(b, rows_per_call)})
    return rows
