"""ONNX Runtime timing rows of ``fastff bench --onnx``: a layer's exported graph against fastff's
own kernels and a dense layer of the same training width."""
from __future__ import annotations

import copy
import os
import tempfile

import torch
from torch import nn

from .. import kernels
from .._checks import check_int
from ..export import export_onnx, onnx_session
from ..io import build
from ..layers import DenseFF
from .timing import median_times


def _layer(spec) -> nn.Module:
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)          # benchmarking must not change the caller's layer
    if isinstance(spec, dict) and isinstance(spec.get("layer"), str):
        return build(spec["layer"], **{k: v for k, v in spec.items() if k != "layer"})
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
                times = median_times({"onnx": lambda: [session.run(None, f) for f in feeds],
                                      "dense": lambda: dense(x), "fastff": lambda: layer(x)}, repeats)
            ms, dense_ms, own_ms = (1e3 * times[k] for k in ("onnx", "dense", "fastff"))
            rows.append({"layer": name, "batch": b, "depth": layer.depth, "backend": "onnxruntime",
                         "ms": ms, "dense_ms": dense_ms, "speedup_vs_dense": dense_ms / ms,
                         "fastff_ms": own_ms, "fastff_backend": layer.backend or kernels.get_backend(),
                         "onnx_rows_per_call": min(b, rows_per_call)})
    return rows
