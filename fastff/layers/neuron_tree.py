"""Neuron tree: the UltraFastBERT variant of FFF (arXiv 2311.10770)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_choice, check_int
from .. import kernels
from ..functional import ACTIVATIONS
from ._base import RoutedLayer


class NeuronTree(RoutedLayer):
    """``trees`` parallel binary trees of depth ``depth``; every one of the ``2**(depth+1) - 1``
    nodes of a tree is a neuron. Per row and tree, start at the root, and on each of the
    ``depth + 1`` levels add ``act(a) · w_out[node]`` with ``a = x·w_in[node] + b_in[node]``,
    then go right iff ``a >= 0``. x (..., in_features) -> (..., out_features).

    Routing is by sign in both train and eval, so gradients reach only the visited neurons.
    ``depth=0`` is a dense FF of width ``trees``. Parameters: w_in (K, M, in), b_in (K, M),
    w_out (K, M, out), b_out (out,) if ``bias``. Init: w_in, b_in uniform ±1/sqrt(in);
    w_out, b_out uniform ±1/sqrt(K·(depth+1)) (the neurons active per row).
    """

    def __init__(self, in_features: int, out_features: int, depth: int, trees: int = 1,
                 activation: str = "gelu", bias: bool = True, backend: str | None = None):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.depth = check_int("depth", depth, 0, 30)
        self.trees = check_int("trees", trees, 1)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self.backend = None if backend is None else check_choice("backend", backend, ("auto", *kernels.BACKENDS))
        M = (1 << (depth + 1)) - 1
        b_in, b_out = 1 / math.sqrt(in_features), 1 / math.sqrt(trees * (depth + 1))
        self.w_in = nn.Parameter(torch.empty(trees, M, in_features).uniform_(-b_in, b_in))
        self.b_in = nn.Parameter(torch.empty(trees, M).uniform_(-b_in, b_in))
        self.w_out = nn.Parameter(torch.empty(trees, M, out_features).uniform_(-b_out, b_out))
        self.b_out = nn.Parameter(torch.empty(out_features).uniform_(-b_out, b_out)) if bias else None

    @property
    def neurons_per_tree(self) -> int:
        return (1 << (self.depth + 1)) - 1

    @property
    def training_width(self) -> int:
        """All neurons: ``trees * (2**(depth+1) - 1)``."""
        return self.trees * self.neurons_per_tree

    @property
    def neurons_per_inference(self) -> int:
        """Neurons evaluated per row: ``trees * (depth + 1)``."""
        return self.trees * (self.depth + 1)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        backend = kernels.vectorized if self.training else kernels.resolve(self.backend, x)
        return backend.neuron_tree(x, self.w_in, self.b_in, self.w_out, self.b_out, self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}, "
                f"trees={self.trees}, activation={self.activation!r}, bias={self.b_out is not None}")
