"""Slow, obviously-correct forwards: one Python tree walk per row (backend ``"reference"``).

The ground truth of every test of the fast paths, and the per-sample-loop baseline in benchmarks.
Differentiable (plain torch ops). Shapes: x (B, I); FFF node_w (N, I), node_b (N,), w1 (L, I, H),
b1 (L, H), w2 (L, H, O), b2 (L, O); NeuronTree w_in (K, M, I), b_in (K, M), w_out (K, M, O),
b_out (O,) or None.
"""
from __future__ import annotations

import torch

from ..functional import (child_index, fff_depth, get_activation, go_right, hard_path_from_logits, leaf_paths,
                          mixture_weights, taken_prob, tree_levels)


def _stack(rows: list, x: torch.Tensor, features: int) -> torch.Tensor:
    return torch.stack(rows) if rows else x.new_zeros(0, features)


def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool = False) -> torch.Tensor:
    """Hard FFF inference: walk each row to one leaf, evaluate only that leaf (times the product
    of the taken branches' probabilities if ``gated``). -> (B, O)."""
    act = get_activation(activation)
    rows = []
    for row in x:
        node, gate = 0, 1.0
        for _ in range(fff_depth(w1.shape[0])):
            logit = row @ node_w[node] + node_b[node]
            gate = gate * taken_prob(logit)
            node = int(child_index(node, go_right(logit)))
        leaf = node - len(node_b)
        y = act(row @ w1[leaf] + b1[leaf]) @ w2[leaf] + b2[leaf]
        rows.append(gate * y if gated else y)
    return _stack(rows, x, w2.shape[-1])


def fff_soft(x, node_w, node_b, w1, b1, w2, b2, activation: str, p=None) -> torch.Tensor:
    """Soft FFF (training forward): every leaf weighted by the product of the decisions on its
    root path. ``p`` (B, N) overrides the decisions sigmoid(x·w + b). -> (B, O)."""
    act = get_activation(activation)
    depth = fff_depth(w1.shape[0])
    if p is None:
        p = torch.sigmoid(x @ node_w.T + node_b)

    path_nodes, path_right = (t.tolist() for t in leaf_paths(depth))

    def leaf_weight(b: int, leaf: int):
        weight = 1.0
        for node, right in zip(path_nodes[leaf], path_right[leaf]):
            weight = weight * (p[b, node] if right else 1 - p[b, node])
        return weight

    rows = [sum(leaf_weight(b, leaf) * (act(row @ w1[leaf] + b1[leaf]) @ w2[leaf] + b2[leaf])
                for leaf in range(w1.shape[0]))
            for b, row in enumerate(x)]
    return _stack(rows, x, w2.shape[-1])


def neuron_tree_visits(x, w_in, b_in, route_bias=None) -> torch.Tensor:
    """Visited node per row, tree and level by a per-row walk (right iff the pre-activation plus
    ``route_bias[k, node]`` is >= 0; route_bias (K, M) or None). -> (B, K, D+1) long."""
    levels = tree_levels(w_in.shape[1])
    visits = torch.zeros(x.shape[0], w_in.shape[0], levels, dtype=torch.long)
    for b, row in enumerate(x):
        for k in range(w_in.shape[0]):
            node = 0
            for t in range(levels):
                visits[b, k, t] = node
                logit = row @ w_in[k, node] + b_in[k, node] + (0 if route_bias is None else route_bias[k, node])
                node = int(child_index(node, go_right(logit)))
    return visits


def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False,
                straight_through: bool = False) -> torch.Tensor:
    """NeuronTree forward: per row and tree, walk from the root and add act(a) · w_out[n] with
    a = x·w_in[n] + b_in[n] for every visited node n, going right iff a + route_bias[k, n] >= 0
    (route_bias (K, M) or None: 0). ``gate``: each neuron's term is scaled by the product, over
    the nodes above it on the path, of the taken branch's probability sigmoid(|a + route_bias|);
    ``straight_through``: by that product divided by its detached self (value 1, its gradient).
    -> (B, O)."""
    act = get_activation(activation)
    rows = []
    for row in x:
        out = w_out.new_zeros(w_out.shape[-1]) if b_out is None else b_out.clone()
        for k in range(w_in.shape[0]):
            node, g = 0, x.new_ones(())
            for _ in range(tree_levels(w_in.shape[1])):
                a = row @ w_in[k, node] + b_in[k, node]
                scale = (g / g.detach() if straight_through else g) if gate else 1.0
                out = out + scale * act(a) * w_out[k, node]
                logit = a if route_bias is None else a + route_bias[k, node]
                g = g * taken_prob(logit)
                node = int(child_index(node, go_right(logit)))
        rows.append(out)
    return _stack(rows, x, w_out.shape[-1])


def _masked_dense(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False,
                  straight_through: bool = False):
    """(output (B, O), visits (B, K, D+1), visited pre-activations (B, K, D+1)) of the masked-dense
    formulation; with ``gate`` the mask holds each visited neuron's path gate instead of 1
    (``straight_through``: the gate divided by its detached self)."""
    act = get_activation(activation)
    visits = neuron_tree_visits(x, w_in, b_in, route_bias)
    dense = torch.einsum("bi,kmi->bkm", x, w_in) + b_in                               # (B, K, M)
    pre = dense.gather(2, visits)                                                     # (B, K, D+1)
    if gate:
        logits = pre if route_bias is None else pre + route_bias[torch.arange(w_in.shape[0])[:, None], visits]
        q = taken_prob(logits)
        on = torch.cat((torch.ones_like(q[..., :1]), q[..., :-1].cumprod(-1)), -1)   # gate of each visited neuron
        on = on / on.detach() if straight_through else on
    else:
        on = torch.ones(visits.shape, dtype=x.dtype)
    mask = torch.zeros(x.shape[0], *w_in.shape[:2], dtype=x.dtype).scatter(2, visits, on)
    y = torch.einsum("bkm,kmo->bo", act(dense) * mask, w_out)
    return (y if b_out is None else y + b_out), visits, pre


def neuron_tree_masked_dense(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None,
                             gate: bool = False, straight_through: bool = False) -> torch.Tensor:
    """UltraFastBERT's training formulation: all K·M neurons computed densely, multiplied by a
    0/1 mask of the visited ones (with ``gate``: by their path gates; ``route_bias`` as in
    ``neuron_tree``). Differentiable; the gradient ground truth. -> (B, O)."""
    return _masked_dense(x, w_in, b_in, w_out, b_out, activation, route_bias, gate, straight_through)[0]


def neuron_tree_paths(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False,
                      preactivations: bool = False, straight_through: bool = False):
    """Training forward of the ``"reference"`` backend: (masked dense output (B, O), visits (B, K, D+1)),
    and the visited pre-activations (B, K, D+1) if ``preactivations``."""
    y, visits, pre = _masked_dense(x, w_in, b_in, w_out, b_out, activation, route_bias, gate, straight_through)
    return (y, visits, pre) if preactivations else (y, visits)


def fff_walk(x, node_w, node_b, flip):
    """Per-row descent (a flipped level takes the other child). -> (nodes (B, d), logits (B, d))."""
    nodes, logits = [], []
    for row, row_flip in zip(x, flip):
        node, visited, zs = 0, [], []
        for t in range(flip.shape[1]):
            z = row @ node_w[node] + node_b[node]
            visited.append(node)
            zs.append(z)
            node = int(child_index(node, go_right(z) ^ row_flip[t]))
        nodes.append(torch.tensor(visited, dtype=torch.long))
        logits.append(torch.stack(zs) if zs else x.new_zeros(0))
    if not nodes:
        return x.new_zeros(0, flip.shape[1], dtype=torch.long), x.new_zeros(0, flip.shape[1])
    return torch.stack(nodes).reshape(len(nodes), -1), torch.stack(logits).reshape(len(nodes), -1)


def fff_leaves(x, w1, b1, w2, b2, gate, leaf, mask, activation: str):
    """Per row: gate · ((act(x·w1[leaf] + b1[leaf]) · mask) · w2[leaf] + b2[leaf]). -> (B, O)."""
    act = get_activation(activation)
    rows = [g * ((act(row @ w1[j] + b1[j]) * mask[b if mask.shape[0] > 1 else 0]) @ w2[j] + b2[j])
            for b, (row, g, j) in enumerate(zip(x, gate, leaf.tolist()))]
    if not rows:                                   # empty batch: (0, O), still part of the graph
        return gate[:, None] * (act(x @ w1[0] + b1[0]) @ w2[0] + b2[0])
    return torch.stack(rows)


def fff_hard_path(x, node_w, node_b, w1, b1, w2, b2, activation: str, p=None) -> torch.Tensor:
    """Switch-style top-1 FFF training forward, the slow way: every leaf evaluated densely,
    then masked to the greedy leaf (at each node the more probable child, right iff p >= 0.5)
    and weighted by that leaf's soft mixture weight. ``p`` (B, N) overrides the decisions
    sigmoid(x·w + b) (e.g. region leak). Differentiable. -> (B, O)."""
    act = get_activation(activation)
    depth = fff_depth(w1.shape[0])
    if p is None:
        p = torch.sigmoid(x @ node_w.T + node_b)
    leaf = hard_path_from_logits(p - 0.5, depth).leaf                                  # right iff p >= 0.5
    mask = torch.nn.functional.one_hot(leaf, w1.shape[0]).to(x.dtype)                  # (B, L)
    h = act(torch.einsum("bi,lih->blh", x, w1) + b1)
    leaves = torch.einsum("blh,lho->blo", h, w2) + b2                                  # (B, L, O)
    return torch.einsum("bl,blo->bo", mixture_weights(p, depth) * mask, leaves)
