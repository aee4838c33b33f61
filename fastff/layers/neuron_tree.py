"""Neuron tree: the UltraFastBERT variant of FFF (arXiv 2311.10770)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_bool, check_choice, check_fraction, check_int, check_parameter_bytes
from .. import kernels
from ..functional import ACTIVATIONS, GATES, tree_routing_logits, tree_size, tree_table_rows
from ._base import EagerKernel, RoutedLayer
from .dense import DenseFF

USAGE = (None, "hard")


class NeuronTree(EagerKernel, RoutedLayer):
    """``trees`` parallel binary trees of depth ``depth``; every one of the ``2**(depth+1) - 1``
    nodes of a tree is a neuron. Per row and tree, start at the root, and on each of the
    ``depth + 1`` levels add ``act(a) · w_out[node]`` with ``a = x·w_in[node] + b_in[node]``,
    then go right iff ``a >= 0`` (the routing logit: ``a``, plus ``route_bias[node]`` with that
    option). x (..., in_features) -> (..., out_features).

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

    Options for trees that do not use their capacity (all off by default):

    - ``route_bias`` (update rate r >= 0): a buffer ``route_bias`` (K, M) offsets the routing
      decisions only (right iff ``a + route_bias[node] >= 0``; the activation still uses ``a``).
      Every training forward, after computing its output, moves the offset of each decision node
      (levels 0..D-1) that a row reached by ``-r·sign(f - 1/2)``, f the fraction of its rows that
      went right (auxiliary-loss-free balancing, as DeepSeek-V3); eval uses the buffer as it is.
    - ``gate="path"``: each visited neuron's term ``act(a)·w_out`` is scaled by the probability
      of the path to it, the product over its ancestors of ``sigmoid(|a + route_bias|)`` (the
      root's gate is 1), so the routing decisions get a gradient; eval computes the same function.
    - ``gate="straight-through"``: the path gate's gradient with the plain tree's forward (each
      term scaled by ``gate / gate.detach()``, 1 in value): deep neurons are not damped by a
      product of probabilities, and eval serves a plain tree (on every backend's fast path).
    - ``dense_slice`` (width): a ``DenseFF`` of that width and the same activation, ``dense``,
      evaluated for every row and added to the output (counted in both widths).

    ``route_bias > 0`` and ``gate="path"`` run on the ``"cpu"``, ``"torch"`` and ``"reference"``
    backends: ``"auto"`` runs such a layer on ``"cpu"`` for CPU float32/float64 tensors outside
    ``torch.compile`` tracing (no-grad eval: the prepared per-row walk with offset and gate;
    training: the walk on the grouped descent, the visited neurons on ``fastff.kernels.gathered``'s
    ops, O(K·(D+1)·(in+out)) per row, forward and backward), else on ``"torch"``; ``"triton"``
    raises ``ValueError``.

    Every training forward records in ``aux["node_balance"]`` (K, M), per decision node reached
    by n of the B rows, ``(n/B)·(mean over those rows of sigmoid(routing logit) - 1/2)^2`` (0
    elsewhere; differentiable in the routing weights), which ``fastff.training.node_balance_loss``
    sums.
    """

    _reference = "w_in"

    def __init__(self, in_features: int, out_features: int, depth: int, trees: int = 1,
                 activation: str = "gelu", bias: bool = True, backend: str | None = None,
                 usage: str | None = None, route_bias: float = 0.0, gate: str = "none", dense_slice: int = 0):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.depth = check_int("depth", depth, 0, 30)
        self.trees = check_int("trees", trees, 1)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self.backend = None if backend is None else check_choice("backend", backend, ("auto", *kernels.BACKENDS))
        self.route_bias_rate = check_fraction("route_bias", route_bias, high=math.inf)
        self.gate = check_choice("gate", gate, GATES)
        self.dense_slice = check_int("dense_slice", dense_slice, 0)
        M = tree_size(depth)
        check_parameter_bytes(f"NeuronTree(depth={depth}, trees={trees})",
                              trees * M * (in_features + 1 + out_features) + out_features
                              + dense_slice * (in_features + 1 + out_features))
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
        if self.route_bias_rate > 0:
            self.register_buffer("route_bias", torch.zeros(trees, M))
        self.dense = DenseFF(in_features, out_features, dense_slice, activation) if dense_slice else None

    @property
    def neurons_per_tree(self) -> int:
        return tree_size(self.depth)

    @property
    def training_width(self) -> int:
        """All neurons: ``trees * (2**(depth+1) - 1)`` (+ ``dense_slice``)."""
        return self.trees * self.neurons_per_tree + self.dense_slice

    @property
    def neurons_per_inference(self) -> int:
        """Neurons evaluated per row: ``trees * (depth + 1)`` (+ ``dense_slice``)."""
        return self.trees * (self.depth + 1) + self.dense_slice

    def routed_options(self) -> dict:
        """The routing options of the served function, as the backends take them: ``route_bias``
        (the buffer) when the update rate is > 0, ``gate=True`` for ``gate="path"``; {} for a plain
        tree (and for ``gate="straight-through"``, whose forward is the plain tree's)."""
        options = {}
        if "route_bias" in self._buffers:
            options["route_bias"] = self._buffers["route_bias"]
        if self.gate == "path":
            options["gate"] = True
        return options

    def training_options(self) -> dict:
        """``routed_options`` plus, for ``gate="straight-through"``, ``gate=True,
        straight_through=True`` (the training path's gradient through the routing decisions)."""
        options = self.routed_options()
        if self.gate == "straight-through":
            options.update(gate=True, straight_through=True)
        return options

    def reset_usage(self) -> None:
        """Zero the usage counter (no-op without ``usage``)."""
        if self.usage is not None:
            self.neuron_usage.zero_()

    def _eager_config(self) -> tuple:
        return (self.activation, self.gate == "path")

    def _prepare_eager(self, backend):
        tree = self._prepared(backend, "neuron_tree", ("w_in", "b_in", "w_out", "b_out"), ("route_bias",))
        if tree is None or self.dense is None:
            return tree

        def with_dense_slice(x):
            y = tree(x)
            return None if y is None else y + self.dense(x)
        return with_dense_slice

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        y = self._tree(x)
        return y if self.dense is None else y + self.dense(x)

    def _tree(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return kernels.resolve(self.backend).neuron_tree(
                x, self._param("w_in"), self._param("b_in"), self._param("w_out"), self._param("b_out"),
                self.activation, **self.routed_options())
        options = self.training_options()
        y, nodes, pre = kernels.resolve(self.backend).neuron_tree_paths(
            x, self.w_in, self.b_in, self.w_out, self.b_out, self.activation, preactivations=True, **options)
        if self.usage == "hard":
            rows = tree_table_rows(nodes, self.neurons_per_tree).flatten()
            self.neuron_usage.view(-1).index_add_(0, rows, torch.ones_like(rows, dtype=self.neuron_usage.dtype))
        self._record(nodes, pre, options.get("route_bias"))
        return y

    def _record(self, nodes: torch.Tensor, pre: torch.Tensor, route_bias: torch.Tensor | None) -> None:
        """``aux["node_balance"]`` of this training forward, then the ``route_bias`` update (see the
        class docstring). nodes, pre (B, K, D+1): the visited nodes and their pre-activations."""
        (B, K, _), D, M = nodes.shape, self.depth, self.neurons_per_tree
        decided = nodes[..., :D]                                         # the levels whose decision routes
        index = tree_table_rows(decided, M).flatten()
        logits = tree_routing_logits(pre[..., :D], decided, route_bias)
        reached = pre.new_zeros(K * M).index_add_(0, index, torch.ones_like(index, dtype=pre.dtype))
        mean = pre.new_zeros(K * M).index_add(0, index, torch.sigmoid(logits).flatten()) / reached.clamp_min(1)
        self.aux = {"node_balance": (reached / max(1, B) * (mean - 0.5).square()).view(K, M)}
        if route_bias is not None and D > 0:
            with torch.no_grad():
                right = pre.new_zeros(K * M).index_add_(0, index, (nodes[..., 1:] % 2 == 0).flatten().to(pre.dtype))
                step = (2 * right - reached).sign()                     # sign(f - 1/2); 0 where unreached
                route_bias.view(-1).sub_(self.route_bias_rate * step.to(route_bias.dtype))

    def extra_repr(self) -> str:
        extra = [f"usage={self.usage!r}"] if self.usage is not None else []
        extra += [f"route_bias={self.route_bias_rate}"] if self.route_bias_rate > 0 else []
        extra += [f"gate={self.gate!r}"] if self.gate != "none" else []
        extra += [f"dense_slice={self.dense_slice}"] if self.dense_slice else []
        return (f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}, "
                f"trees={self.trees}, activation={self.activation!r}, bias={self.b_out is not None}"
                + "".join(", " + e for e in extra))
