"""``torch.export`` and ONNX export of eval-mode models with FFF / NeuronTree layers.

Export traces the ``"torch"`` backend (hard routing as gathers: per level one ``GatherND`` of
the current node's weights, a dot product and a ``>= 0`` comparison; then a gather of the
reached leaf, times the path's gate for FFFs trained with ``train_mode="hard_path"``), whatever
backend the layers use otherwise. The batch dimension (dim 0 of the input) is dynamic. ``MoE``
is not exportable (its expert grouping is data-dependent Python). Needs
``pip install onnx onnxruntime onnxscript`` for the ONNX parts.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from . import kernels


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
    """An eval-mode model traced on the ``"torch"`` backend (``kernels.forced_backend``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"export needs an eval-mode model (call model.eval()); in training mode: {training}")
    with kernels.forced_backend("torch"):
        yield


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
