"""Vectorised PyTorch paths (backend ``"torch"``): gathers, no Python loop over rows, any device,
differentiable (inference and training).

Inference rows are processed in chunks so the gathered per-row weights stay under
``CHUNK_BYTES`` (one chunk while traced by ``torch.export`` / ``torch.compile``, so the batch
dimension stays symbolic).
"""
from __future__ import annotations

import torch

from ..functional import fff_depth, get_activation, hard_path, neuron_tree_walk, taken_prob, tree_levels
from .routing import neuron_tree_visited

CHUNK_BYTES = 64 << 20


def _chunks(x: torch.Tensor, bytes_per_row: int):
    if torch.compiler.is_compiling() or not x.shape[0]:
        return (x,)
    return x.split(max(1, CHUNK_BYTES // max(1, bytes_per_row)))


def _leaf_mlp(x, w1, b1, w2, b2, leaf, activation: str, mask=None) -> torch.Tensor:
    """Each row through its own leaf: act(x·w1[leaf] + b1[leaf]) (· mask) · w2[leaf] + b2[leaf]."""
    h = get_activation(activation)(torch.einsum("bi,bih->bh", x, w1[leaf]) + b1[leaf])
    if mask is not None:
        h = h * mask
    return torch.einsum("bh,bho->bo", h, w2[leaf]) + b2[leaf]


def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool = False) -> torch.Tensor:
    """Hard FFF forward. x (B, I) -> (B, O); see ``fastff.kernels.reference.fff_hard``."""
    depth = fff_depth(w1.shape[0])
    per_row = (w1[0].numel() + w2[0].numel()) * x.element_size()
    outs = []
    for xc in _chunks(x, per_row):
        path = hard_path(xc, node_w, node_b, depth)
        y = _leaf_mlp(xc, w1, b1, w2, b2, path.leaf, activation)
        outs.append(y * taken_prob(path.logits).prod(1, keepdim=True) if gated else y)
    return torch.cat(outs)


def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False) -> torch.Tensor:
    """NeuronTree forward. x (B, I) -> (B, O); see ``reference.neuron_tree`` (``route_bias``,
    ``gate``: as there)."""
    levels, K = tree_levels(w_in.shape[1]), w_in.shape[0]
    per_row = K * levels * (w_in.shape[-1] + w_out.shape[-1]) * x.element_size()
    return torch.cat([neuron_tree_paths(xc, w_in, b_in, w_out, b_out, activation, route_bias, gate)[0]
                      for xc in _chunks(x, per_row)])


def _walk(x, w_in, b_in, route_bias):
    """``functional.neuron_tree_walk`` as ``routing.neuron_tree_visited`` takes it: -> (pre, nodes)."""
    nodes, a = neuron_tree_walk(x, w_in, b_in, tree_levels(w_in.shape[1]) - 1, route_bias)
    return a, nodes


def _combine(c, w, idx):
    """(B, O) = Σ_s c[r, s] · w[idx[r, s]], on a gathered (B, S, O) tensor."""
    return torch.einsum("bs,bso->bo", c, w[idx])


def neuron_tree_paths(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False,
                      preactivations: bool = False, straight_through: bool = False):
    """NeuronTree forward with the visited nodes. -> (y (B, O), nodes (B, K, D+1) long), and the
    visited pre-activations (B, K, D+1) if ``preactivations``; differentiable through the visited
    neurons only. ``route_bias`` (K, M) offsets the decisions only; ``gate`` scales each visited
    neuron's output by its path gate (``functional.neuron_tree_path_gate``; ``straight_through``:
    value 1, the gate's gradient)."""
    y, nodes, a = neuron_tree_visited(_walk, _combine, x, w_in, b_in, w_out, b_out, activation, route_bias, gate,
                                      straight_through)
    return (y, nodes, a) if preactivations else (y, nodes)


def fff_walk(x, node_w, node_b, flip):
    """Hard descent (``functional.hard_path``). flip (B, d) bool -> (nodes (B, d), logits (B, d))."""
    path = hard_path(x, node_w, node_b, flip.shape[1], flip)
    return path.nodes, path.logits


def fff_leaves(x, w1, b1, w2, b2, gate, leaf, mask, activation: str):
    """gate · leaf MLP of each row's ``leaf`` with hidden ``mask`` (B, H) or (1, H). -> (B, O)."""
    return gate[:, None] * _leaf_mlp(x, w1, b1, w2, b2, leaf, activation, mask)
