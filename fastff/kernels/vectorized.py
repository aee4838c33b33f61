"""Vectorised PyTorch inference paths (backend ``"torch"``): gathers, no Python loop over rows.

Rows are processed in chunks so the gathered per-row weights stay under ``CHUNK_BYTES``.
Both functions are differentiable and run on any device.
"""
from __future__ import annotations

import torch

from ..functional import get_activation, hard_leaf_index, neuron_tree_walk

CHUNK_BYTES = 64 << 20


def _chunks(x: torch.Tensor, bytes_per_row: int):
    step = max(1, CHUNK_BYTES // max(1, bytes_per_row))
    return x.split(step) if x.shape[0] else (x,)


def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str) -> torch.Tensor:
    """Hard FFF inference. x (B, I) -> (B, O); see ``fastff.kernels.reference.fff_hard``."""
    act = get_activation(activation)
    depth = w1.shape[0].bit_length() - 1
    per_row = (w1[0].numel() + w2[0].numel()) * x.element_size()
    outs = []
    for xc in _chunks(x, per_row):
        leaf = hard_leaf_index(xc, node_w, node_b, depth)
        h = act(torch.einsum("bi,bih->bh", xc, w1[leaf]) + b1[leaf])
        outs.append(torch.einsum("bh,bho->bo", h, w2[leaf]) + b2[leaf])
    return torch.cat(outs)


def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str) -> torch.Tensor:
    """NeuronTree forward (train and eval). x (B, I) -> (B, O); see ``reference.neuron_tree``."""
    act = get_activation(activation)
    depth = (w_in.shape[1] + 1).bit_length() - 2
    K = w_in.shape[0]
    per_row = K * (depth + 1) * (w_in.shape[-1] + w_out.shape[-1]) * x.element_size()
    tree = torch.arange(K, device=x.device)[:, None]
    outs = []
    for xc in _chunks(x, per_row):
        nodes, a = neuron_tree_walk(xc, w_in, b_in, depth)          # (B, K, D+1)
        y = torch.einsum("bkt,bkto->bo", act(a), w_out[tree, nodes])
        outs.append(y if b_out is None else y + b_out)
    return torch.cat(outs)
