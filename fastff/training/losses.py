"""Auxiliary losses collected over every routed layer of a model (like HF's router aux loss).

Both read ``layer.aux``, which each FFF / MoE layer fills during its last training forward,
and sum over layers. Add them to the prediction loss:
``loss = ce + h * hardening_loss(model) + load_balancing_loss(model, alpha)``.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_fraction

HARDENING_MODES = ("reach", "mean")


def _records(model: nn.Module, key: str) -> list[torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    records = [m.aux[key] for m in model.modules() if key in getattr(m, "aux", {})]
    if not records:
        raise RuntimeError(f"no layer of {type(model).__name__} has recorded '{key}': the model needs an "
                           f"FFF{' or MoE' if key.startswith('route') else ''} layer and a training-mode "
                           f"forward before the loss is computed")
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
