"""Routing maths, tree geometry and the activation table: each defined once, here.

Trees are stored in heap order: node 0 is the root, the children of node ``i`` are
``2*i + 1`` (left) and ``2*i + 2`` (right). A row goes right at a node iff the node's
pre-activation is ``>= 0`` (equivalently, its sigmoid decision is ``>= 0.5``). Every torch
path calls ``go_right`` / ``child_index``; the compiled kernels (numba, Triton), which cannot
call Python, restate the rule once each (``kernels/numba/common.py``, ``kernels/triton.py``).

Geometry: an FFF of depth ``d`` has ``N = 2**d - 1`` decision nodes and ``L = 2**d`` leaves; a
neuron tree of depth ``D`` has ``M = 2**(D+1) - 1`` neurons on ``D + 1`` levels. Kernels read
depths from weight shapes with ``fff_depth`` / ``tree_levels``.

Shapes: ``B`` rows, ``I`` input features, ``K`` parallel trees.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_CODES",
    "get_activation",
    "activation_code",
    "go_right",
    "left_child",
    "child_index",
    "n_nodes",
    "fff_depth",
    "tree_size",
    "tree_levels",
    "taken_prob",
    "HardPath",
    "hard_path",
    "hard_path_from_logits",
    "mixture_weights",
    "leaf_paths",
    "node_reach",
    "bernoulli_entropy",
    "neuron_tree_walk",
    "tree_routing_logits",
    "neuron_tree_path_gate",
    "straight_through_gate",
    "GATES",
]

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


# How a neuron tree's routing decisions get a gradient: "none" (they get none), "path" (each visited
# neuron's term is scaled by its path gate, ``neuron_tree_path_gate``), "straight-through" (the same
# gradient, scaled by 1 / the gate, with the plain tree's forward: ``straight_through_gate``).
GATES = ("none", "path", "straight-through")


# The numbering the compiled kernels (numba, Triton) use for the activations above.
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def get_activation(name: str):
    """The elementwise function registered as ``name`` (see ``ACTIVATIONS``)."""
    return ACTIVATIONS[name]


def activation_code(name: str) -> int:
    """The kernels' code of activation ``name``; ValueError for an unknown name."""
    code = ACTIVATION_CODES.get(name)
    if code is None:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {name!r}")
    return code


def go_right(logit: torch.Tensor) -> torch.Tensor:
    """The routing rule: right iff the node's pre-activation is ``>= 0`` (bool tensor)."""
    return logit >= 0


def left_child(node):
    """Heap-order left child of ``node`` (int or long tensor): ``2*node + 1``; the right child
    is the next node."""
    return 2 * node + 1


def child_index(node: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Heap-order child of ``node``: ``2*node + 1 + right``."""
    return left_child(node) + right.long()


def taken_prob(logit: torch.Tensor) -> torch.Tensor:
    """Probability of the branch the routing rule takes at a node with this logit:
    ``sigmoid(|logit|)`` (>= 0.5). The product along a path is the hard path's gate."""
    return torch.sigmoid(logit.abs())


def n_nodes(depth: int) -> int:
    """Decision nodes of an FFF of this depth: ``2**depth - 1``."""
    return (1 << depth) - 1


def fff_depth(n_leaves: int) -> int:
    """Depth of an FFF with ``n_leaves = 2**depth`` leaves (e.g. ``w1.shape[0]``)."""
    return n_leaves.bit_length() - 1


def tree_size(depth: int) -> int:
    """Neurons of one neuron tree of this depth: ``2**(depth+1) - 1``."""
    return (2 << depth) - 1


def tree_levels(size: int) -> int:
    """Levels ``depth + 1`` of a neuron tree of ``size = 2**(depth+1) - 1`` neurons (e.g. ``w_in.shape[1]``)."""
    return (size + 1).bit_length() - 1


class HardPath(NamedTuple):
    """One hard descent per row: nodes (B, d) long the visited decision nodes, logits (B, d)
    their pre-activations (differentiable), leaf (B,) long the reached leaf."""
    nodes: torch.Tensor
    logits: torch.Tensor
    leaf: torch.Tensor


def hard_path(x: torch.Tensor, node_w: torch.Tensor, node_b: torch.Tensor, depth: int,
              flip: torch.Tensor | None = None) -> HardPath:
    """Hard descent through FFF decision nodes, vectorised over rows. x (B, I), node_w (N, I),
    node_b (N,), flip (B, depth) bool or None: a flipped level takes the other child (region
    leak). One gathered dot product per level: O(depth * I) per row."""
    node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    nodes, logits = [], []
    for t in range(depth):
        logit = torch.einsum("bi,bi->b", x, node_w[node]) + node_b[node]
        nodes.append(node)
        logits.append(logit)
        right = go_right(logit) if flip is None else go_right(logit) ^ flip[:, t]
        node = child_index(node, right)
    if not nodes:
        empty = x.new_zeros(x.shape[0], 0)
        return HardPath(empty.long(), empty, node)
    return HardPath(torch.stack(nodes, 1), torch.stack(logits, 1), node - n_nodes(depth))


def hard_path_from_logits(logits: torch.Tensor, depth: int) -> HardPath:
    """``hard_path`` when every node's logit is already known: logits (B, N) -> the rows' hard
    descents (nodes (B, d), their logits (B, d), leaf (B,))."""
    node = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    nodes, taken = [], []
    for _ in range(depth):
        logit = logits.gather(1, node[:, None])[:, 0]
        nodes.append(node)
        taken.append(logit)
        node = child_index(node, go_right(logit))
    if not nodes:
        empty = logits.new_zeros(logits.shape[0], 0)
        return HardPath(empty.long(), empty, node)
    return HardPath(torch.stack(nodes, 1), torch.stack(taken, 1), node - n_nodes(depth))


def leaf_paths(depth: int, device=None):
    """For every leaf, the nodes on its root path and the turns taken.

    Returns (nodes (L, depth) long, right (L, depth) bool): leaf ``j`` is reached by going
    ``right[j, t]`` at node ``nodes[j, t]`` on level ``t``.
    """
    leaves = torch.arange(1 << depth, device=device)
    nodes = torch.zeros(1 << depth, depth, dtype=torch.long, device=device)
    right = torch.zeros(1 << depth, depth, dtype=torch.bool, device=device)
    node = torch.zeros_like(leaves)
    for t in range(depth):
        bit = (leaves >> (depth - 1 - t)) & 1
        nodes[:, t] = node
        right[:, t] = bit.bool()
        node = child_index(node, right[:, t])
    return nodes, right


def mixture_weights(p: torch.Tensor, depth: int) -> torch.Tensor:
    """Soft mixture over leaves. p (B, N) right-probabilities -> (B, L), rows sum to 1.

    Built level by level: each node splits its mass into (1-p) left and p right, so the
    children of level t are interleaved [left, right] pairs of level t's mass.
    """
    mass = p.new_ones(p.shape[0], 1)
    for t in range(depth):
        level = p[:, (1 << t) - 1 : (1 << (t + 1)) - 1]  # (B, 2**t)
        mass = torch.stack((mass * (1 - level), mass * level), dim=-1).flatten(1)
    return mass


def node_reach(p: torch.Tensor, depth: int) -> torch.Tensor:
    """Probability mass reaching each decision node. p (B, N) -> (B, N); root reach is 1."""
    reach = [p.new_ones(p.shape[0], 1)]
    for t in range(depth - 1):
        level = p[:, (1 << t) - 1 : (1 << (t + 1)) - 1]
        reach.append(torch.stack((reach[-1] * (1 - level), reach[-1] * level), dim=-1).flatten(1))
    return torch.cat(reach, dim=1) if depth > 0 else p.new_zeros(p.shape[0], 0)


def bernoulli_entropy(logit: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy (nats) of Bernoulli(sigmoid(logit)), computed stably from the logit:
    ``H = softplus(z) - z·sigmoid(z)``; exactly 0 for saturated decisions, symmetric in z."""
    return F.softplus(logit) - logit * torch.sigmoid(logit)


def neuron_tree_walk(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, depth: int,
                     route_bias: torch.Tensor | None = None):
    """Sign-routed descent of K neuron trees, vectorised over rows and trees.

    x (B, I), w_in (K, M, I), b_in (K, M) with M = 2**(depth+1) - 1; ``route_bias`` (K, M) or
    None: a per-node offset used only in the decision (right iff ``a + route_bias[node] >= 0``).
    Returns (nodes (B, K, depth+1) long, pre-activations ``a`` (B, K, depth+1), without the
    routing offset); differentiable in x, w_in and b_in through the visited neurons only.
    """
    B, K = x.shape[0], w_in.shape[0]
    tree = torch.arange(K, device=x.device).expand(B, K)
    node = torch.zeros(B, K, dtype=torch.long, device=x.device)
    nodes, acts = [], []
    for _ in range(depth + 1):
        a = torch.einsum("bi,bki->bk", x, w_in[tree, node]) + b_in[tree, node]
        nodes.append(node)
        acts.append(a)
        node = child_index(node, go_right(a if route_bias is None else a + route_bias[tree, node]))
    return torch.stack(nodes, dim=-1), torch.stack(acts, dim=-1)


def tree_table_rows(nodes: torch.Tensor, neurons_per_tree: int) -> torch.Tensor:
    """Rows of the trees' flattened (K·M, F) weight tables: nodes (B, K, T) long, node numbers per
    tree -> (B, K, T) long, ``k·M + node``."""
    return nodes + torch.arange(nodes.shape[1], device=nodes.device)[:, None] * neurons_per_tree


def tree_routing_logits(pre: torch.Tensor, nodes: torch.Tensor, route_bias: torch.Tensor | None) -> torch.Tensor:
    """The decision logits of a neuron-tree walk: pre (B, K, T) + route_bias (K, M) at the visited
    nodes (B, K, T) long; ``pre`` itself without a routing offset."""
    if route_bias is None:
        return pre
    return pre + route_bias[torch.arange(route_bias.shape[0], device=nodes.device)[:, None], nodes]


def neuron_tree_path_gate(logits: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """Per visited neuron, the probability of the path that led to it: logits (B, K, T) of the
    visited nodes -> (B, K, T), 1 at the root, then the running product over the ancestors of
    ``taken_prob`` (sigmoid(|logit|)). The deepest level's own decision leads nowhere and is unused.
    ``straight_through``: ``straight_through_gate`` of it (value 1, the gate's gradient)."""
    q = taken_prob(logits[..., :-1])
    gate = torch.cat((torch.ones_like(logits[..., :1]), q.cumprod(-1)), dim=-1)
    return straight_through_gate(gate) if straight_through else gate


def straight_through_gate(gate: torch.Tensor) -> torch.Tensor:
    """``gate / gate.detach()``: 1 in value, so a gated term keeps its hard-routed value, while its
    gradient is the gate's relative gradient (d log gate), which reaches the routing logits."""
    return gate / gate.detach()
