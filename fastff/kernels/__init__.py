"""Inference backends and the dispatch between them.

Backends implement ``fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation)`` and
``neuron_tree(x, w_in, b_in, w_out, b_out, activation)`` on 2-D inputs:

- ``"reference"``: per-row Python walk (slow, obviously correct; tests and baselines);
- ``"torch"``: vectorised gathers, any device, differentiable;
- ``"cpu"``: numba kernels (``fastff.kernels.cpu``), CPU float32/float64, inference only;
  registered as the ops ``torch.ops.fastff.fff_hard`` / ``torch.ops.fastff.neuron_tree_hard``;
- ``"triton"``: Triton GPU kernels (``fastff.kernels.triton``, imported on first use), CUDA
  tensors, inference only; runs on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1``;
- ``"auto"`` (default): ``"cpu"`` when it applies — every tensor on the CPU in float32/float64
  and no gradient needed (grad mode off, e.g. ``torch.no_grad()`` / ``torch.inference_mode()``,
  or nothing requires grad) — ``"triton"`` for CUDA tensors that need no gradient when Triton is
  installed, else ``"torch"``.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from .._checks import check_choice
from . import cpu, reference, vectorized

_HAS_TRITON = importlib.util.find_spec("triton") is not None


class _LazyModule:
    """A backend module imported on first attribute access (Triton is slow to import)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


triton = _LazyModule("fastff.kernels.triton")
BACKENDS = {"reference": reference, "torch": vectorized, "cpu": cpu, "triton": triton}
_default = "auto"


def set_backend(name: str) -> None:
    """Choose the default inference backend for every layer: ``"auto"`` or a name in ``BACKENDS``."""
    global _default
    _default = check_choice("backend", name, ("auto", *BACKENDS))


def get_backend() -> str:
    """The current default backend name."""
    return _default


def cpu_applies(*tensors) -> bool:
    """Whether ``"auto"`` runs these tensors (None skipped) on the ``"cpu"`` kernels: all on the
    CPU in one dtype of ``cpu.DTYPES``, and no gradient needed."""
    dtype = tensors[0].dtype
    if dtype not in cpu.DTYPES or _needs_grad(tensors):
        return False
    return all(t is None or (t.is_cpu and t.dtype is dtype) for t in tensors)


def triton_applies(*tensors) -> bool:
    """Whether ``"auto"`` runs these tensors (None skipped) on the ``"triton"`` kernels."""
    return (_HAS_TRITON and all(t is None or t.is_cuda for t in tensors) and not _needs_grad(tensors))


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Auto:
    """Backend ``"auto"``: picks ``cpu``, ``triton`` or ``torch`` per call, looking at every tensor.
    (The eager CPU case is the hot path of every batch-1 call: one cached weight lookup.)"""

    @staticmethod
    def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str) -> torch.Tensor:
        weights = (node_w, node_b, w1, b1, w2, b2)
        if not _needs_grad((x, *weights)):
            views = cpu.usable_views(x, weights)
            if views is not None:
                return cpu.fff_eager(x, views, activation)
        return _pick((x, *weights)).fff_hard(x, *weights, activation)

    @staticmethod
    def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str) -> torch.Tensor:
        weights = (w_in, b_in, w_out, b_out)
        if not _needs_grad((x, *weights)):
            views = cpu.usable_views(x, weights)
            if views is not None:
                return cpu.neuron_tree_eager(x, views, activation)
        return _pick((x, *weights)).neuron_tree(x, *weights, activation)


def _pick(tensors):
    """The backend for calls ``usable_views`` did not take: the CPU op when traced, else Triton
    or torch."""
    if cpu_applies(*tensors):
        return cpu
    return triton if triton_applies(*tensors) else vectorized


AUTO = _Auto()


def resolve(backend: str | None, x):
    """The backend that runs ``x``: ``backend`` if given, else the global default. ``"auto"``
    returns a dispatcher that chooses per call (see the module docstring)."""
    name = backend or _default
    if name == "auto":
        return AUTO
    module = BACKENDS.get(name) if isinstance(name, str) else None
    if module is None:
        check_choice("backend", name, ("auto", *BACKENDS))   # raises: not a backend name
    return module
