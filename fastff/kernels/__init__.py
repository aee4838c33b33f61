"""Backends and the one dispatch point between them, for inference and training.

Every backend implements, on 2-D inputs,

- inference: ``fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation, gated=False)`` and
  ``neuron_tree(x, w_in, b_in, w_out, b_out, activation)``;
- training (differentiable, O(depth) per row): ``neuron_tree_paths`` (-> output, visited
  nodes, and with ``preactivations=True`` the visited pre-activations), ``fff_walk`` and
  ``fff_leaves`` (composed into the FFF hard path by ``fastff.kernels.routing.fff_hard_path``).

The NeuronTree routing offset and path gate (``route_bias=``, ``gate=True`` of ``neuron_tree`` /
``neuron_tree_paths``; ``straight_through=True`` of ``neuron_tree_paths``: the gate's gradient
with the plain tree's forward) exist on every backend (``"cpu"``: the walk on the grouped descent, the
visited neurons on the gathered-row ops of ``fastff.kernels.gathered``; ``"triton"``: its blocked
path), with or without gradient; ``"auto"`` runs calls that use them on ``"cpu"`` for CPU
float32/float64 tensors outside ``torch.compile`` / ``torch.export`` tracing, on ``"triton"`` for
CUDA tensors, else on ``"torch"``.

Optional, for repeated eval calls without gradient on the same weights: a *prepared fast
path* ``prepare(op, weights, activation, *flags)`` -> a callable ``x (..., I) -> (..., O)`` (None
for an input it does not take as it is) or None, where ``op`` is ``"fff_hard"`` /
``"neuron_tree"`` and ``weights`` its weight arguments. ``"cpu"`` offers one (``cpu.prepare``),
``"auto"`` where it would pick ``"cpu"``; layers keep it while their weights keep their
``stamp`` (pointers and sizes).

Backends:

- ``"reference"``: per-row Python walks (slow, obviously correct; tests and baselines);
- ``"torch"``: vectorised gathers, any device, differentiable;
- ``"cpu"``: numba kernels (``fastff.kernels.cpu``), CPU float32/float64; hard-inference kernels
  when no gradient is needed (ops ``torch.ops.fastff.fff_hard`` / ``neuron_tree_hard``), the
  conditional training kernels when one is;
- ``"triton"``: Triton GPU kernels (``fastff.kernels.triton``, imported on first use), CUDA
  tensors, inference and training (the blocked walk and the gathered-row ops of
  ``fastff.kernels.triton_gathered``); runs on CPU tensors in Triton's interpreter when
  ``TRITON_INTERPRET=1``;
- ``"auto"`` (default): ``"cpu"`` for CPU float32/float64 tensors (with or without gradients;
  while traced by ``torch.compile`` / ``torch.export`` with gradients: ``"torch"``), ``"triton"``
  for CUDA tensors when Triton is installed (not while traced), else ``"torch"``.

A layer's ``backend=`` (or the global ``set_backend``) picks the backend for its eval and its
training forwards alike; ``forced_backend(name)`` overrides both for a block of code.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch

from .._checks import check_choice
from . import cpu, reference, routing, vectorized
from .cpu import stamp  # noqa: F401  (what a prepared fast path depends on)
from .routing import needs_grad

_HAS_TRITON = importlib.util.find_spec("triton") is not None


class _LazyModule:
    """A backend module imported on first attribute access (Triton is slow to import)."""

    def __init__(self, name: str):
        self._name = name

    prepare = None  # no prepared fast path (importing Triton just to find none would be slow)

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


triton = _LazyModule("fastff.kernels.triton")
BACKENDS = {"reference": reference, "torch": vectorized, "cpu": cpu, "triton": triton}
_default = "auto"
_forced: str | None = None


def set_backend(name: str) -> None:
    """Choose the default backend of every layer without its own ``backend``: ``"auto"`` or a
    name in ``BACKENDS``."""
    global _default
    _default = check_choice("backend", name, ("auto", *BACKENDS))


def get_backend() -> str:
    """The current default backend name."""
    return _default


@contextlib.contextmanager
def forced_backend(name: str):
    """Within the block every layer runs on backend ``name``, whatever its own ``backend``
    (e.g. ``"torch"`` while exporting a graph)."""
    global _forced
    check_choice("backend", name, ("auto", *BACKENDS))
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def cpu_applies(*tensors) -> bool:
    """Whether ``"auto"`` runs these tensors (None skipped) on the ``"cpu"`` kernels."""
    return cpu.applies(*tensors) and not (torch.compiler.is_compiling() and needs_grad(*tensors))


def triton_applies(*tensors) -> bool:
    """Whether ``"auto"`` runs these tensors (None skipped) on the ``"triton"`` kernels: CUDA
    tensors, Triton installed, not traced by ``torch.compile`` / ``torch.export``."""
    return _HAS_TRITON and all(t is None or t.is_cuda for t in tensors) and not torch.compiler.is_compiling()


def _routed_on_cpu(*tensors) -> bool:
    """Whether ``"auto"`` runs a NeuronTree with ``route_bias`` / ``gate`` on ``"cpu"``: CPU
    float32/float64 tensors (None skipped), not traced by ``torch.compile`` / ``torch.export``."""
    return cpu.applies(*tensors) and not torch.compiler.is_compiling()


def _pick(tensors, on_cpu=cpu_applies):
    """The backend ``"auto"`` runs these tensors on: ``"cpu"`` where ``on_cpu`` says so (for a
    NeuronTree with ``route_bias`` / ``gate``: ``_routed_on_cpu``), else ``"triton"`` where it
    applies, else ``"torch"``."""
    if on_cpu(*tensors):
        return cpu
    return triton if triton_applies(*tensors) else vectorized


class _Auto:
    """Backend ``"auto"``: picks ``cpu``, ``triton`` or ``torch`` per call, looking at every tensor."""

    @staticmethod
    def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool = False) -> torch.Tensor:
        weights = (node_w, node_b, w1, b1, w2, b2)
        return _pick((x, *weights)).fff_hard(x, *weights, activation, gated)

    @staticmethod
    def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False) -> torch.Tensor:
        weights = (w_in, b_in, w_out, b_out)
        if route_bias is not None or gate:
            backend = _pick((x, *weights, route_bias), _routed_on_cpu)
            return backend.neuron_tree(x, *weights, activation, route_bias, gate)
        return _pick((x, *weights)).neuron_tree(x, *weights, activation)

    @staticmethod
    def neuron_tree_paths(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False,
                          preactivations: bool = False, straight_through: bool = False):
        weights = (w_in, b_in, w_out, b_out)
        if route_bias is not None or gate:
            backend = _pick((x, *weights, route_bias), _routed_on_cpu)
            return backend.neuron_tree_paths(x, *weights, activation, route_bias, gate, preactivations,
                                             straight_through=straight_through)
        return _pick((x, *weights)).neuron_tree_paths(x, *weights, activation, preactivations=preactivations)

    @staticmethod
    def prepare(op: str, weights: tuple, activation: str, *flags):
        return cpu.prepare(op, weights, activation, *flags) if cpu_applies(*weights) else None

    @staticmethod
    def fff_walk(x, node_w, node_b, flip):
        return _pick((x, node_w, node_b)).fff_walk(x, node_w, node_b, flip)

    @staticmethod
    def fff_leaves(x, w1, b1, w2, b2, gate, leaf, mask, activation: str):
        return _pick((x, w1, b1, w2, b2)).fff_leaves(x, w1, b1, w2, b2, gate, leaf, mask, activation)


AUTO = _Auto()


def resolve(backend: str | None):
    """The backend a layer with ``backend`` runs on (the forced one, else its own, else the global
    default): a module with the interface above, or for ``"auto"`` a dispatcher that chooses per
    call. Called on every layer forward (the eval hot path too)."""
    name = _forced or backend or _default
    if name == "auto":
        return AUTO
    module = BACKENDS.get(name) if isinstance(name, str) else None
    if module is None:
        check_choice("backend", name, ("auto", *BACKENDS))   # raises: not a backend name
    return module


def fff_hard_path(x, node_w, node_b, w1, b1, w2, b2, activation: str, flip=None, hardened: bool = False,
                  dropout: float = 0.0, backend: str | None = None):
    """``routing.fff_hard_path`` on the training ops of ``backend`` (see ``resolve``)."""
    be = resolve(backend)
    return routing.fff_hard_path(be.fff_walk, be.fff_leaves, x, node_w, node_b, w1, b1, w2, b2, activation,
                                 flip, hardened, dropout)

