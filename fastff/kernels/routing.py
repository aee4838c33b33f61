"""Differentiable hard routing composed from a backend's training primitives.

A backend that trains provides ``fff_walk`` (hard descent, logits differentiable),
``fff_leaves`` (gate · reached leaf, rows grouped by leaf) and ``neuron_tree_paths``; this module
composes the FFF hard path from them once, for every backend: the training forward of
``FFF(train_mode="hard_path")`` and the differentiable eval forward of any FFF. It also composes
a NeuronTree from a differentiable walk and a gathered-row combine (``neuron_tree_visited``), for
the backends that run the routing options that way.
"""
from __future__ import annotations

import torch

from ..functional import (child_index, fff_depth, get_activation, go_right, neuron_tree_path_gate, taken_prob,
                          tree_routing_logits, tree_table_rows)


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


def neuron_tree_visited(walk, combine, x, w_in, b_in, w_out, b_out, activation: str, route_bias=None,
                        gate: bool = False, straight_through: bool = False):
    """NeuronTree forward through the visited neurons only: the walk gives every visited
    pre-activation, the activation (times the path gate if ``gate``; with ``straight_through`` its
    straight-through version, ``functional.straight_through_gate``) runs in torch on (B, K, T),
    and ``combine`` sums the visited rows of ``w_out``.

    walk(x, w_in, b_in, route_bias) -> (pre (B, K, T) differentiable, nodes (B, K, T) long), the
    decisions offset by ``route_bias`` (K, M) and ``pre`` without it; combine: a backend's
    ``gathered_combine(c (B, S), w (R, O), idx (B, S)) -> (B, O)``. -> (y (B, O), nodes, pre) as a
    backend's ``neuron_tree_paths(..., preactivations=True)``."""
    (K, M, _), O, B = w_in.shape, w_out.shape[-1], x.shape[0]
    pre, nodes = walk(x, w_in, b_in, route_bias)
    h = get_activation(activation)(pre)
    if gate:
        h = h * neuron_tree_path_gate(tree_routing_logits(pre, nodes, route_bias), straight_through)
    T = pre.shape[2]
    ids = tree_table_rows(nodes, M).reshape(B, K * T)
    y = combine(h.reshape(B, K * T), w_out.reshape(K * M, O), ids)
    return (y if b_out is None else y + b_out), nodes, pre
