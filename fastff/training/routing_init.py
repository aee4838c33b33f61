"""Routing-aware initialisation of FFF trees: every decision node starts as a balanced split of
the training rows that reach it, so all leaves receive data from the first step (a random
initialisation sends most rows down a few paths, and hardening then freezes that collapse)."""
from __future__ import annotations

import torch

from ..functional import go_right, left_child, n_nodes
from ..layers.fff import FFF

ROUTING_INITS = ("none", "pca")


def _top_direction(x: torch.Tensor, iters: int) -> torch.Tensor:
    """First principal direction of the centred rows x (T, in) by power iteration -> (in,) unit."""
    c = x - x.mean(0)
    v = c.abs().sum(0) + 1.0                                  # deterministic start, not orthogonal to the top PC
    for _ in range(iters):
        v = c.T @ (c @ v)
        v = v / v.norm().clamp_min(1e-12)
    return v


@torch.no_grad()
def pca_routing_init(layer: FFF, x: torch.Tensor, logit_std: float = 1.0, iters: int = 30) -> None:
    """Set every node of ``layer`` (top-down, heap order) to the median split of the rows of
    x (T, in) that reach it along their first principal direction: ``w = v / std(x·v) * logit_std``,
    ``b = -median(x·w)``; children are fitted on the rows the parent's hyperplane sends them.
    A node reached by fewer than 2 rows keeps its random initialisation."""
    rows = {0: x.to(layer.node_w.dtype)}
    for node in range(n_nodes(layer.depth)):
        xr = rows.pop(node)
        if xr.shape[0] >= 2:
            v = _top_direction(xr, iters)
            proj = xr @ v
            scale = logit_std / proj.std().clamp_min(1e-12)
            layer.node_w[node] = v * scale
            layer.node_b[node] = -(proj * scale).median()
        right = go_right(xr @ layer.node_w[node] + layer.node_b[node])
        left = left_child(node)
        rows[left], rows[left + 1] = xr[~right], xr[right]
