"""Auxiliary losses collected over every routed layer of a model (like HF's router aux loss).

They read ``layer.aux``, which each FFF / MoE / NeuronTree layer fills during its last training
forward, and sum over layers. Add them to the prediction loss:
``loss = ce + h * hardening_loss(model) + load_balancing_loss(model, alpha)`` (FFF, MoE), or
``loss = ce + node_balance_loss(model, alpha)`` (NeuronTree).
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_fraction

HARDENING_MODES = ("reach", "mean")
# The layers that record each ``aux`` key (the rest: FFF only), named in the error without a record.
_RECORDED_BY = {"route_fraction": "an FFF or MoE", "route_prob": "an FFF or MoE", "node_balance": "a NeuronTree"}


def _records(model: nn.Module, key: str) -> list[torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    records = [m.aux[key] for m in model.modules() if key in getattr(m, "aux", {})]
    if not records:
        layers = _RECORDED_BY.get(key, "an FFF")
        raise RuntimeError(f"no layer of {type(model).__name__} has recorded '{key}': the model needs "
                           f"{layers} layer and a training-mode forward before the loss is computed")
    return records


def hardening_loss(model: nn.Module, mode: str = "reach") -> torch.Tensor:
    """Node-decision entropy summed over nodes and layers (scalar).

    ``mode="reach"`` (default): each node's per-row entropy is weighted by the probability mass
    that reaches the node, so nodes that rows do not reach are not pushed.
    ``mode="mean"``: the paper's plain sum over nodes of the batch-mean entropy (use it, with
    h = 3, to reproduce the FFF paper's tables).
    """
    check_choice("mode", mode, HARDENING_MODES)
    key = "reach_entropy" if mode == "reach" else "node_entropy"
    return torch.stack([r.sum() for r in _records(model, key)]).sum()


def load_balancing_loss(model: nn.Module, alpha: float = 0.01) -> torch.Tensor:
    """Switch-Transformer load balance ``alpha · N · Σ_i f_i · P_i`` per layer, summed over layers.

    f_i: fraction of rows whose hard route ends in leaf / expert i (no gradient); P_i: mean soft
    mixture weight (FFF) or router probability (MoE). Equals ``alpha`` per layer for perfectly
    uniform routing, and grows with imbalance up to ``alpha · N``.
    """
    alpha = check_fraction("alpha", alpha, high=float("inf"))
    fractions = _records(model, "route_fraction")
    probs = _records(model, "route_prob")
    return torch.stack([alpha * len(f) * (f * p).sum() for f, p in zip(fractions, probs)]).sum()


def node_balance_loss(model: nn.Module, alpha: float = 0.01) -> torch.Tensor:
    """Neuron-tree routing balance ``alpha · Σ_nodes (n/B)·(mean σ(logit) - 1/2)^2`` per layer,
    summed over layers (scalar).

    For every decision node (levels 0..D-1, every tree) reached by n of a batch's B rows: the
    squared deviation from 1/2 of the mean over those rows of sigmoid(routing logit) (the
    pre-activation, plus the layer's ``route_bias`` offset when it has one), weighted by the
    fraction of rows reaching it. 0 when every reached node's mean decision is 1/2; at most
    ``alpha · D · K / 4`` per layer. Differentiable in the routing weights (w_in, b_in) and the input.
    """
    alpha = check_fraction("alpha", alpha, high=float("inf"))
    return torch.stack([alpha * r.sum() for r in _records(model, "node_balance")]).sum()
