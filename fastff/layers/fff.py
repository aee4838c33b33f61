"""Fast feedforward layer (Belcak & Wattenhofer, arXiv 2308.14711)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_bool, check_choice, check_fraction, check_int, check_parameter_bytes
from .. import kernels
from ..functional import (ACTIVATIONS, bernoulli_entropy, get_activation, go_right, hard_path_from_logits,
                          mixture_weights, n_nodes, node_reach)
from ._base import EagerKernel, RoutedLayer, batch_mean
from .dense import DenseFF

MASTER_LEAF = (None, "scalar", "token")
USAGE = (None, "soft", "hard")
TRAIN_MODES = ("soft", "hard_path")


def _uniform(shape, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class FFF(EagerKernel, RoutedLayer):
    """A binary tree of ``2**depth - 1`` single-neuron decision nodes over ``2**depth`` leaves,
    each leaf a ``in -> leaf_width -> out`` MLP. x (..., in_features) -> (..., out_features).

    - train mode, ``train_mode="soft"`` (default): soft mixture over all leaves, leaf weight =
      product of sigmoid decisions on its path (costs a dense layer of width 2**depth·leaf_width);
      ``region_leak`` swaps each (row, node) decision p -> 1-p with that probability;
      ``train_hardened`` makes each decision hard by the sign of its logit (the eval rule; nodes
      then get no gradient).
    - ``train_mode="hard_path"``: Switch-style top-1 routing down the tree. Each row descends
      greedily (more probable child at every node, after region leak), only the reached leaf
      is evaluated, and its output is multiplied by the *gate*, that leaf's soft mixture weight
      (the product of the taken branches' probabilities), so the visited nodes get gradients
      (``train_hardened``: the gate is 1). Forward and backward cost
      O(depth·in + leaf_width·(in + out)) per row (``fastff.kernels.fff_hard_path``). ``aux``
      and ``usage`` then see only the hard path: ``route_prob`` is the batch mean of the gate
      credited to the reached leaf, ``node_entropy`` / ``reach_entropy`` sum each row's entropy
      at the visited nodes only (the latter weighted by the path probability reaching the
      node, a constant: see ``hardening_loss``), soft usage adds the gate to the reached leaf
      and the path reach to the visited nodes.
    - eval mode: hard descent (right iff x·w + b >= 0), only the reached leaf is evaluated. A
      layer whose training forward is gated (``train_mode="hard_path"`` without
      ``train_hardened``) multiplies the leaf output by the same gate, so eval computes the
      function it was trained as (without the training noise: region leak, dropout). Runs on
      the backend chosen by ``backend`` or ``fastff.set_backend``; differentiable in the leaf
      (and gated: node) weights when autograd needs it.
    - ``master_leaf``: an always-on dense leaf of ``master_width`` neurons (default
      ``leaf_width``) blended as ``g·tree(x) + (1-g)·master(x)``, with ``g = sigmoid(k)`` for
      one trainable scalar (``"scalar"``) or ``g = sigmoid(x·u + c)`` per row (``"token"``).
    - ``usage``: accumulate leaf/node usage in training forwards into the buffers
      ``leaf_usage`` (L,) and ``node_usage`` (N,): ``"soft"`` sums mixture / reach
      probabilities, ``"hard"`` counts hard paths. ``reset_usage()`` zeroes them.

    Parameters: node_w (N, in), node_b (N,), w1 (L, in, leaf_width), b1 (L, leaf_width),
    w2 (L, leaf_width, out), b2 (L, out); all uniform ±1/sqrt(fan_in).
    """

    _reference = "node_w"

    def __init__(self, in_features: int, out_features: int, depth: int, leaf_width: int,
                 activation: str = "relu", dropout: float = 0.0, region_leak: float = 0.0,
                 train_hardened: bool = False, master_leaf: str | None = None,
                 usage: str | None = None, master_width: int | None = None,
                 backend: str | None = None, train_mode: str = "soft"):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.depth = check_int("depth", depth, 0, 30)
        self.leaf_width = check_int("leaf_width", leaf_width, 1)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self.dropout = check_fraction("dropout", dropout)
        self.region_leak = check_fraction("region_leak", region_leak)
        self.train_hardened = check_bool("train_hardened", train_hardened)
        self.master_leaf = check_choice("master_leaf", master_leaf, MASTER_LEAF)
        self.usage = check_choice("usage", usage, USAGE)
        self.train_mode = check_choice("train_mode", train_mode, TRAIN_MODES)
        self.backend = None if backend is None else check_choice("backend", backend, ("auto", *kernels.BACKENDS))
        N, L, H = n_nodes(depth), 1 << depth, leaf_width
        check_parameter_bytes(f"FFF(depth={depth}, leaf_width={leaf_width})",
                              N * (in_features + 1) + L * (in_features * H + H + H * out_features + out_features))
        self.node_w = _uniform((N, in_features), in_features)
        self.node_b = _uniform((N,), in_features)
        self.w1 = _uniform((L, in_features, H), in_features)
        self.b1 = _uniform((L, H), in_features)
        self.w2 = _uniform((L, H, out_features), H)
        self.b2 = _uniform((L, out_features), H)
        if master_width is not None:
            check_int("master_width", master_width, 1)
            if master_leaf is None:
                raise ValueError(f"master_width={master_width} needs master_leaf='scalar' or 'token'")
        self.master = None
        if master_leaf is not None:
            width = leaf_width if master_width is None else master_width
            self.master = DenseFF(in_features, out_features, width, activation)
            self.gate = nn.Linear(in_features, 1) if master_leaf == "token" else nn.Parameter(torch.zeros(1))
            if master_leaf == "token":
                nn.init.zeros_(self.gate.weight)
                nn.init.zeros_(self.gate.bias)
        if usage is not None:
            self.register_buffer("leaf_usage", torch.zeros(L))
            self.register_buffer("node_usage", torch.zeros(N))

    @property
    def n_leaves(self) -> int:
        return 1 << self.depth

    @property
    def training_width(self) -> int:
        """Leaf neurons trained: ``2**depth * leaf_width`` (the paper's width w)."""
        return self.n_leaves * self.leaf_width

    @property
    def neurons_per_inference(self) -> int:
        """Neurons evaluated per row in eval: depth nodes + one leaf (+ master leaf and gate)."""
        extra = 0 if self.master is None else self.master.hidden + (self.master_leaf == "token")
        return self.depth + self.leaf_width + extra

    def reset_usage(self) -> None:
        """Zero the usage counters (no-op without ``usage``)."""
        if self.usage is not None:
            self.leaf_usage.zero_()
            self.node_usage.zero_()

    @property
    def gated(self) -> bool:
        """Whether the tree's output is multiplied by its hard path's gate (train and eval)."""
        return self.train_mode == "hard_path" and not self.train_hardened

    def master_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The tree's share g of the blend ``g·tree(x) + (1-g)·master(x)``: ``sigmoid(k)`` (1,)
        or per row ``sigmoid(x·u + c)`` (B, 1). x (B, in); needs a master leaf."""
        return torch.sigmoid(self.gate(x) if self.master_leaf == "token" else self.gate)

    def _eager_config(self) -> tuple:
        return (self.activation, self.gated)

    def _prepare_eager(self, backend):
        if self.master is not None:
            return None
        return self._prepared(backend, "fff_hard", ("node_w", "node_b", "w1", "b1", "w2", "b2"))

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            tree = self._soft(x) if self.train_mode == "soft" else self._hard_path(x)
        else:
            p = self._param
            tree = kernels.resolve(self.backend).fff_hard(
                x, p("node_w"), p("node_b"), p("w1"), p("b1"), p("w2"), p("b2"), self.activation, self.gated)
        if self.master is None:
            return tree
        g = self.master_gate(x)
        return g * tree + (1 - g) * self.master(x)

    def _soft(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward: soft mixture over all leaves; records ``aux`` and usage."""
        logits = x @ self.node_w.T + self.node_b                      # (B, N)
        flip = torch.rand_like(logits) < self.region_leak if self.region_leak > 0 else None
        if self.train_hardened:                                        # the eval rule: sign of the logit
            right = go_right(logits) if flip is None else go_right(logits) ^ flip
            p = right.to(logits.dtype)
        else:
            p = torch.sigmoid(logits)
            p = p if flip is None else torch.where(flip, 1 - p, p)
        mix = mixture_weights(p, self.depth)                           # (B, L)
        h = get_activation(self.activation)(torch.einsum("bi,lih->blh", x, self.w1) + self.b1)
        h = nn.functional.dropout(h, self.dropout, training=True)
        y = torch.einsum("blh,lho->bo", h * mix[..., None], self.w2) + mix @ self.b2
        self._record(logits, p, mix)
        return y

    def _hard_path(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward for ``train_mode="hard_path"``; records ``aux`` and usage."""
        flip = None
        if self.region_leak > 0:
            flip = torch.rand(x.shape[0], self.depth, device=x.device) < self.region_leak
        y, q, leaf, nodes, logits = kernels.fff_hard_path(
            x, self.node_w, self.node_b, self.w1, self.b1, self.w2, self.b2, self.activation,
            flip=flip, hardened=self.train_hardened, dropout=self.dropout, backend=self.backend)
        B, N, L = x.shape[0], n_nodes(self.depth), self.n_leaves
        gate = q.prod(1)                                               # (B,)
        reach = torch.cat((q.new_ones(B, 1), q[:, :-1].detach().cumprod(1)), 1) if self.depth else q.detach()
        entropy = bernoulli_entropy(logits)                            # (B, d) visited nodes only

        def per_node(v: torch.Tensor) -> torch.Tensor:                # (B, d) on the path -> (N,)
            return v.new_zeros(N).index_add(0, nodes.flatten(), v.flatten()) / max(1, B)

        counts = torch.bincount(leaf, minlength=L).to(x.dtype)
        self.aux = {
            "node_entropy": per_node(entropy),                         # (N,)
            "reach_entropy": per_node(reach * entropy),                # (N,)
            "route_fraction": counts / max(1, B),                      # (L,) hard, no grad
            "route_prob": x.new_zeros(L).index_add(0, leaf, gate) / max(1, B),   # (L,)
        }
        if self.usage == "soft":
            self.leaf_usage.index_add_(0, leaf, gate.detach().to(self.leaf_usage.dtype))
            self.node_usage.index_add_(0, nodes.flatten(), reach.flatten().to(self.node_usage.dtype))
        elif self.usage == "hard":
            self.leaf_usage += counts.to(self.leaf_usage.dtype)
            self.node_usage += torch.bincount(nodes.flatten(), minlength=N).to(self.node_usage.dtype)
        return y

    def _record(self, logits: torch.Tensor, p: torch.Tensor, mix: torch.Tensor) -> None:
        entropy = bernoulli_entropy(logits)                            # (B, N)
        reach = node_reach(p, self.depth).detach()
        path = hard_path_from_logits(logits.detach(), self.depth)
        leaf = path.leaf
        counts = torch.bincount(leaf, minlength=self.n_leaves).to(mix.dtype)
        self.aux = {
            "node_entropy": batch_mean(entropy),                       # (N,)
            "reach_entropy": batch_mean(reach * entropy),              # (N,)
            "route_fraction": counts / max(1, logits.shape[0]),         # (L,) hard, no grad
            "route_prob": batch_mean(mix),                             # (L,)
        }
        if self.usage == "soft":
            self.leaf_usage += mix.detach().sum(0).to(self.leaf_usage.dtype)
            self.node_usage += reach.sum(0).to(self.node_usage.dtype)
        elif self.usage == "hard":
            self.leaf_usage += counts.to(self.leaf_usage.dtype)
            node_counts = torch.bincount(path.nodes.flatten(), minlength=n_nodes(self.depth))
            self.node_usage += node_counts.to(self.node_usage.dtype)

    def extra_repr(self) -> str:
        opts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                f"depth={self.depth}", f"leaf_width={self.leaf_width}", f"activation={self.activation!r}"]
        for name, default in (("dropout", 0.0), ("region_leak", 0.0), ("train_hardened", False),
                              ("master_leaf", None), ("usage", None), ("backend", None),
                              ("train_mode", "soft")):
            if getattr(self, name) != default:
                opts.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(opts)

