"""Neuron tree: the UltraFastBERT variant of FFF (arXiv 2311.10770)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_bool, check_choice, check_int, check_parameter_bytes
from .. import kernels
from ..functional import ACTIVATIONS, tree_size
from ._base import EagerKernel, RoutedLayer

USAGE = (None, "hard")


class NeuronTree(EagerKernel, RoutedLayer):
    """``trees`` parallel binary trees of depth ``depth``; every one of the ``2**(depth+1) - 1``
    nodes of a tree is a neuron. Per row and tree, start at the root, and on each of the
    ``depth + 1`` levels add ``act(a) · w_out[node]`` with ``a = x·w_in[node] + b_in[node]``,
    then go right iff ``a >= 0``. x (..., in_features) -> (..., out_features).

    Routing is by sign in both train and eval, so train and eval compute the same function and
    gradients reach only the visited neurons; training runs the backend's ``neuron_tree_paths``
    (on CPU numba kernels), whose forward and backward touch only those neurons' weight rows
    (O(trees·(depth+1)·(in+out)) per row).
    ``usage="hard"`` counts, in training forwards, how many rows visited each neuron into the
    buffer ``neuron_usage`` (K, M) (for ``fastff.training.LocalSGD`` / ``LocalAdam``);
    ``reset_usage()`` zeroes it.
    ``depth=0`` is a dense FF of width ``trees``. Parameters: w_in (K, M, in), b_in (K, M),
    w_out (K, M, out), b_out (out,) if ``bias``. Init: w_in, b_in uniform ±1/sqrt(in);
    w_out, b_out uniform ±1/sqrt(K·(depth+1)) (the neurons active per row).
    """

    _reference = "w_in"

    def __init__(self, in_features: int, out_features: int, depth: int, trees: int = 1,
                 activation: str = "gelu", bias: bool = True, backend: str | None = None,
                 usage: str | None = None):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.depth = check_int("depth", depth, 0, 30)
        self.trees = check_int("trees", trees, 1)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self.backend = None if backend is None else check_choice("backend", backend, ("auto", *kernels.BACKENDS))
        M = tree_size(depth)
        check_parameter_bytes(f"NeuronTree(depth={depth}, trees={trees})",
                              trees * M * (in_features + 1 + out_features) + out_features)
        b_in, b_out = 1 / math.sqrt(in_features), 1 / math.sqrt(trees * (depth + 1))
        self.w_in = nn.Parameter(torch.empty(trees, M, in_features).uniform_(-b_in, b_in))
        self.b_in = nn.Parameter(torch.empty(trees, M).uniform_(-b_in, b_in))
        self.w_out = nn.Parameter(torch.empty(trees, M, out_features).uniform_(-b_out, b_out))
        if check_bool("bias", bias):
            self.b_out = nn.Parameter(torch.empty(out_features).uniform_(-b_out, b_out))
        else:
            self.register_parameter("b_out", None)
        self.usage = check_choice("usage", usage, USAGE)
        if usage is not None:
            self.register_buffer("neuron_usage", torch.zeros(trees, M))

    @property
    def neurons_per_tree(self) -> int:
        return tree_size(self.depth)

    @property
    def training_width(self) -> int:
        """All neurons: ``trees * (2**(depth+1) - 1)``."""
        return self.trees * self.neurons_per_tree

    @property
    def neurons_per_inference(self) -> int:
        """Neurons evaluated per row: ``trees * (depth + 1)``."""
        return self.trees * (self.depth + 1)

    def reset_usage(self) -> None:
        """Zero the usage counter (no-op without ``usage``)."""
        if self.usage is not None:
            self.neuron_usage.zero_()

    def _eager_config(self) -> tuple:
        return (self.activation,)

    def _prepare_eager(self):
        return self._prepared(kernels.cpu.prepare_neuron_tree, ("w_in", "b_in", "w_out", "b_out"))

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return kernels.resolve(self.backend).neuron_tree(
                x, self._param("w_in"), self._param("b_in"), self._param("w_out"), self._param("b_out"),
                self.activation)
        y, nodes = kernels.resolve(self.backend, training=True).neuron_tree_paths(
            x, self.w_in, self.b_in, self.w_out, self.b_out, self.activation)
        if self.usage == "hard":
            rows = (nodes + torch.arange(self.trees, device=x.device)[:, None] * self.neurons_per_tree).flatten()
            self.neuron_usage.view(-1).index_add_(0, rows, torch.ones_like(rows, dtype=self.neuron_usage.dtype))
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}, "
                f"trees={self.trees}, activation={self.activation!r}, bias={self.b_out is not None}"
                + ("" if self.usage is None else f", usage={self.usage!r}"))
