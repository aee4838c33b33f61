"""Product-key feedforward, the slow way: one Python loop per row, head and candidate.

The ground truth of the tests of the vectorised torch path and the numba kernel
(``fastff.kernels.product_key``). Differentiable (plain torch ops; the selection is made on
Python floats, the selected scores are recomputed as tensors). Shapes: x (B, I), w_query
(H, D, I), sub_keys (H, 2, n, D/2), w_in (n², I), w_out (n², O), b_out (O,); experts (B, H, k).

Selection rule (shared by every implementation): a top-k takes the k largest scores, and among
equal scores the smaller index first: sub-key index for the two sub-key top-k's, expert index
``a·n + b`` for the top-k of the k×k candidate sums ``s1[a] + s2[b]``.
"""
from __future__ import annotations

import torch

from ..functional import get_activation

EPS = 1e-5   # variance epsilon of the layer and batch query norms


def _top(scores: list[float], indices: list[int], k: int) -> list[int]:
    """Positions of the k largest ``scores``; ties: smaller ``indices`` first."""
    return sorted(range(len(scores)), key=lambda p: (-scores[p], indices[p]))[:k]


def queries(x, w_query, query_norm: str, running=None) -> torch.Tensor:
    """Normalised queries, row by row. -> (B, H, D). ``query_norm``: "layer" (each head's query
    minus its mean, over its standard deviation), "batch" (each of the H·D features minus its
    mean over rows, over its standard deviation; ``running`` = (mean, var) (H·D,) uses those
    instead of the batch's), "none"."""
    H, D, _ = w_query.shape
    rows = []
    for row in x:
        q = torch.stack([torch.stack([row @ w_query[h, d] for d in range(D)]) for h in range(H)])
        if query_norm == "layer":
            mean = q.mean(-1, keepdim=True)
            var = ((q - mean) ** 2).mean(-1, keepdim=True)
            q = (q - mean) / torch.sqrt(var + EPS)
        rows.append(q)
    q = torch.stack(rows) if rows else x.new_zeros(0, H, D)
    if query_norm == "batch":
        flat = q.reshape(-1, H * D)
        if running is None:
            mean = flat.mean(0)
            var = ((flat - mean) ** 2).mean(0)
        else:
            mean, var = running
        q = ((flat - mean) / torch.sqrt(var + EPS)).reshape(-1, H, D)
    return q


def product_key(x, w_query, sub_keys, w_in, w_out, b_out, top_k: int, activation: str, query_norm: str,
                running=None):
    """Product-key forward. -> (y (B, O), experts (B, H, k) long, in selection order).

    Per row and head h: q = queries (see ``queries``), halves q1, q2; s1[a] = q1·sub_keys[h, 0, a],
    s2[b] = q2·sub_keys[h, 1, b]; A, B = the top-k sub-keys of s1, s2; the experts are the top-k
    of s1[a] + s2[b] over A × B (expert a·n + b) with weights softmax(their scores); y = b_out +
    Σ_h Σ_experts weight · act(x·w_in[e]) · w_out[e]."""
    act = get_activation(activation)
    H, D, _ = w_query.shape
    n, half = sub_keys.shape[2], D // 2
    q = queries(x, w_query, query_norm, running)
    outs, chosen = [], []
    for row, qr in zip(x, q):
        out, row_experts = b_out.clone(), []
        for h in range(H):
            s1 = [qr[h, :half] @ sub_keys[h, 0, a] for a in range(n)]
            s2 = [qr[h, half:] @ sub_keys[h, 1, b] for b in range(n)]
            A = _top([s.item() for s in s1], list(range(n)), top_k)
            B = _top([s.item() for s in s2], list(range(n)), top_k)
            pairs = [(a, b) for a in A for b in B]
            sums = [s1[a] + s2[b] for a, b in pairs]
            picked = _top([s.item() for s in sums], [a * n + b for a, b in pairs], top_k)
            weights = torch.softmax(torch.stack([sums[p] for p in picked]), 0)
            for weight, p in zip(weights, picked):
                e = pairs[p][0] * n + pairs[p][1]
                out = out + weight * act(row @ w_in[e]) * w_out[e]
                row_experts.append(e)
        outs.append(out)
        chosen.append(row_experts)
    if not outs:
        return b_out.expand(0, -1), torch.zeros(0, H, top_k, dtype=torch.long)   # (0, O), in the graph
    return torch.stack(outs), torch.tensor(chosen, dtype=torch.long).reshape(len(outs), H, top_k)
