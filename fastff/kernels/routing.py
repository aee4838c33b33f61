"""Differentiable hard routing composed from a backend's training primitives.

A backend that trains provides ``fff_walk`` (hard descent, logits differentiable),
``fff_leaves`` (gate · reached leaf, rows grouped by leaf) and ``neuron_tree_paths``; this module
composes the FFF hard path from them once, for every backend: the training forward of
``FFF(train_mode="hard_path")`` and the differentiable eval forward of any FFF.
"""
from __future__ import annotations

import torch

from ..functional import child_index, fff_depth, go_right, taken_prob


def needs_grad(*tensors) -> bool:
    """Whether autograd must see a computation on these tensors (None skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fff_hard_path(walk, leaves, x, node_w, node_b, w1, b1, w2, b2, activation: str, flip=None,
                  hardened: bool = False, dropout: float = 0.0):
    """Switch-style top-1 FFF forward: one hard descent, only the reached leaf evaluated.

    At each level the row takes the more probable child of its decision ``p = sigmoid(z)``
    (right iff the node logit ``z >= 0``; a level with ``flip`` set — region leak, p -> 1-p —
    takes the other child). The leaf output is multiplied by the gate, the product of the taken
    branches' probabilities ``sigmoid(|z|)`` (``functional.taken_prob``), which is the reached
    leaf's soft mixture weight, so the visited nodes get gradients (``hardened``: the gate is 1
    and nodes get none). ``dropout`` acts on the leaf's hidden units. Cost per row
    O(depth·in + leaf_width·(in + out)), forward and backward.

    walk, leaves: a backend's ``fff_walk`` and ``fff_leaves``. x (B, in), node_w (N, in), node_b (N,),
    w1 (L, in, H), b1 (L, H), w2 (L, H, out), b2 (L, out), flip (B, depth) bool or None ->
    (y (B, out), q (B, depth) the taken branches' probabilities (all ones if ``hardened``),
    leaf (B,) long, nodes (B, depth) long the visited nodes, logits (B, depth) their logits).
    """
    B, (L, H) = x.shape[0], b1.shape
    depth = fff_depth(L)
    if flip is None:
        flip = torch.zeros(B, depth, dtype=torch.bool, device=x.device)
    nodes, logits = walk(x, node_w, node_b, flip)
    if depth:
        leaf = child_index(nodes[:, -1], go_right(logits[:, -1]) ^ flip[:, -1]) - node_b.shape[0]
    else:
        leaf = torch.zeros(B, dtype=torch.long, device=x.device)
    q = torch.ones_like(logits) if hardened else taken_prob(logits)
    mask = (torch.nn.functional.dropout(x.new_ones(B, H), dropout, training=True) if dropout > 0
            else x.new_ones(1, H))
    y = leaves(x, w1, b1, w2, b2, q.prod(1), leaf, mask, activation)
    return y, q, leaf, nodes, logits
