"""The product-key feedforward's fast paths: a vectorised torch forward (any device, differentiable),
the CPU training path (differentiable; numba kernels for the selection, ``numba/product_key.py``,
and the gathered-row ops of ``gathered.py`` for the experts) and the CPU inference kernel (numba,
no gradient).

All compute ``fastff.kernels.product_key_reference.product_key`` (its docstring defines the
function and the selection rule: ties to the smaller index) in O(k) experts per row: the torch
path gathers the selected rows of ``w_in`` and ``w_out`` (``embedding``), so autograd
scatter-adds their gradients into those rows only; the CPU training path reads the selected
rows in place and accumulates their gradients expert by expert. No (B, n²) tensor exists.
Shapes: x (B, I), w_query (H, D, I), sub_keys (H, 2, n, D/2), w_in (n², I), w_out (n², O),
b_out (O,); scores, experts (B, H, k); running = (mean, var) (H·D,) of the batch norm.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..functional import activation_code, get_activation
from ..threads import follow_torch_threads, with_torch_threads
from . import cpu, gathered
from .numba import product_key as kernel
from .product_key_reference import EPS
from .routing import needs_grad

QUERY_NORMS = ("layer", "batch", "none")
MOMENTUM = 0.1   # running-statistics update of the batch query norm (nn.BatchNorm1d's default)
CHUNK_BYTES = 64 << 20   # gathered expert weights per chunk of rows, in inference without gradient


def queries(x, w_query, query_norm: str, running=None, update: bool = False) -> torch.Tensor:
    """Normalised queries. -> (B, H, D). "layer": each head's query over its D values (no affine);
    "batch": each of the H·D features over the rows, with the batch's statistics when ``update``
    (``running`` then updated in place, momentum ``MOMENTUM``) or when ``running`` is None, else
    with ``running``; "none": x·w_query."""
    H, D, _ = w_query.shape
    q = torch.einsum("bi,hdi->bhd", x, w_query)
    if query_norm == "layer":
        return F.layer_norm(q, (D,), eps=EPS)
    if query_norm == "batch":
        batch_stats = update or running is None
        if batch_stats and x.shape[0] == 0:
            return q
        if batch_stats and x.shape[0] == 1:
            raise ValueError("query_norm='batch' needs at least 2 rows per training batch (it normalises each "
                             "query feature over the rows); got 1 row")
        mean, var = running if running is not None else (None, None)
        return F.batch_norm(q.reshape(-1, H * D), mean, var, training=batch_stats, momentum=MOMENTUM,
                            eps=EPS).reshape(-1, H, D)
    return q


def select(q, sub_keys, top_k: int):
    """The top-k experts of each row and head. q (B, H, D) -> (scores (B, H, k), experts (B, H, k)
    long), largest score first, ties to the smaller index (stable sorts)."""
    B, H, D = q.shape
    n = sub_keys.shape[2]
    s = torch.einsum("bhtc,htnc->bhtn", q.reshape(B, H, 2, D // 2), sub_keys)            # (B, H, 2, n)
    val, idx = s.sort(dim=-1, descending=True, stable=True)
    idx, order = idx[..., :top_k].sort(-1)          # ascending sub-keys: the grid is in ascending expert order
    val = val[..., :top_k].gather(-1, order)
    sums = (val[:, :, 0, :, None] + val[:, :, 1, None, :]).reshape(B, H, top_k * top_k)
    grid = (idx[:, :, 0, :, None] * n + idx[:, :, 1, None, :]).reshape(B, H, top_k * top_k)
    scores, pos = sums.sort(dim=-1, descending=True, stable=True)
    return scores[..., :top_k], grid.gather(-1, pos[..., :top_k])


def mix(x, scores, experts, w_in, w_out, b_out, activation: str) -> torch.Tensor:
    """y (B, O) = b_out + Σ_{h, j} softmax_j(scores[:, h])_j · act(x·w_in[e]) · w_out[e], e =
    experts[:, h, j]: the selected rows gathered, O(H·k·(I + O)) per row."""
    B, H, k = experts.shape
    flat = experts.reshape(B, H * k)
    h = get_activation(activation)(torch.einsum("bei,bi->be", F.embedding(flat, w_in), x))      # (B, H·k)
    coef = torch.softmax(scores, -1).reshape(B, H * k) * h
    return torch.einsum("be,beo->bo", coef, F.embedding(flat, w_out)) + b_out


def product_key(x, w_query, sub_keys, w_in, w_out, b_out, top_k: int, activation: str, query_norm: str,
                running=None, update: bool = False):
    """Vectorised product-key forward (``queries``, ``select``, ``mix``); differentiable in x and
    every weight (routing through the softmax over the selected scores, the queries and the
    sub-keys). Without gradient, rows run in chunks whose gathered weights stay under ``CHUNK_BYTES``.
    -> (y (B, O), experts (B, H, k))."""
    q = queries(x, w_query, query_norm, running, update)
    chunk = x.shape[0] or 1
    if not needs_grad(x, w_query, sub_keys, w_in, w_out, b_out) and not torch.compiler.is_compiling():
        chunk = max(1, CHUNK_BYTES // (q.shape[1] * top_k * (w_in.shape[1] + w_out.shape[1]) * x.element_size()))
    ys, chosen = [], []
    for xc, qc in zip(x.split(chunk), q.split(chunk)):
        scores, experts = select(qc, sub_keys, top_k)
        ys.append(mix(xc, scores, experts, w_in, w_out, b_out, activation))
        chosen.append(experts)
    if len(ys) == 1:
        return ys[0], chosen[0]
    return torch.cat(ys), torch.cat(chosen)


def applies(x, *weights) -> bool:
    """Whether the CPU kernel runs these tensors: CPU, one dtype of float32 / float64."""
    return cpu.applies(x, *weights)


def product_key_cpu(x, w_query, sub_keys, w_in, w_out, b_out, top_k: int, activation: str, query_norm: str,
                    running=None):
    """The numba inference kernel (no gradient; "batch" normalises with ``running``, which it
    needs). Same arguments and result as ``product_key``. Raises like ``cpu.check_tensors`` for
    tensors it cannot run."""
    cpu.check_tensors(x, w_query, sub_keys, w_in, w_out, b_out)
    H, D, I = w_query.shape
    B, O = x.shape[0], w_out.shape[1]
    xa = cpu._np(x)
    y, experts = np.empty((B, O), xa.dtype), np.empty((B, H * top_k), np.int64)
    if B:
        shift = scale = np.empty(0, xa.dtype)
        if query_norm == "batch":
            if running is None:
                raise ValueError("the product-key CPU kernel normalises batch-norm queries with the running "
                                 "statistics; pass running=(mean, var)")
            mean, var = running
            cpu.check_tensors(x, mean, var)
            shift, scale = cpu._np(mean), cpu._np(torch.rsqrt(var.detach() + EPS))
        args = (xa, cpu._np(w_query).reshape(H * D, I), cpu._np(sub_keys), cpu._np(w_in), cpu._np(w_out),
                cpu._np(b_out), shift, scale, kernel.NORM_CODES[query_norm], top_k, activation_code(activation),
                EPS, y, experts)
        row_bytes = (H * D * I + H * sub_keys.shape[2] * D + H * top_k * (I + O)) * xa.itemsize
        if cpu._parallel(B, row_bytes):
            with_torch_threads(kernel.pk_parallel, *args)
        else:
            kernel.pk_serial(*args)
    return torch.from_numpy(y), torch.from_numpy(experts).reshape(B, H, top_k)


# ----------------------------------------------------------------------------- CPU training

class _Route(torch.autograd.Function):
    """``select`` and the softmax over each head's selected scores, on the numba kernels:
    s (B, H, 2, n) sub-key scores -> (weights (B, H, k), experts (B, H, k) long); the weights are
    differentiable in s (each score is s[.., 0, a] + s[.., 1, b])."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, s, top_k):
        B, H, _, n = s.shape
        weights = torch.empty((B, H, top_k), dtype=s.dtype)
        experts = torch.empty((B, H, top_k), dtype=torch.long)
        if B:
            kernel.pk_route(s.detach().numpy(), top_k, weights.numpy(), experts.numpy())
        ctx.save_for_backward(weights, experts)
        ctx.n = n
        ctx.mark_non_differentiable(experts)
        return weights, experts

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g, _):
        weights, experts = ctx.saved_tensors
        B, H, _ = experts.shape
        gs = torch.empty((B, H, 2, ctx.n), dtype=g.dtype)
        if B:
            kernel.pk_route_grad(cpu._np(g), weights.numpy(), experts.numpy(), ctx.n, gs.numpy())
        return gs, None


def route_cpu(s: torch.Tensor, top_k: int):
    """``select`` from the sub-key scores s (B, H, 2, n) (CPU float32 / float64: the queries
    einsum'd with the sub-keys), then each head's softmax, on the numba kernels: -> (weights
    (B, H, k) = softmax of the selected scores, experts (B, H, k) long), largest score first,
    ties to the smaller index; the weights differentiable in s."""
    cpu.check_tensors(s)
    return _Route.apply(s, top_k)


def experts_cpu(x, p, w_in, w_out, experts, activation: str) -> torch.Tensor:
    """y (B, O) = Σ_j p[:, j] · act(x · w_in[e]) · w_out[e], e = experts[:, j]: the gathered-row ops
    (``gathered.gathered_dots`` for the pre-activations, ``gathered_combine`` for the output; numba
    forward and backward, O(S·(I + O)) per row), the activation and weights in torch on (B, S).
    x (B, I), p (B, S), experts (B, S) long; CPU float32 / float64 (raises like
    ``cpu.check_tensors`` otherwise). Differentiable in x, p, w_in and w_out, with the gradients of
    the torch expression ``mix`` evaluates; weight gradients are dense, zero in the rows no pair
    selects."""
    cpu.check_tensors(x, p, w_in, w_out)
    h = get_activation(activation)(gathered.gathered_dots(x, w_in, experts))
    return gathered.gathered_combine(p * h, w_out, experts)


def product_key_train_cpu(x, w_query, sub_keys, w_in, w_out, b_out, top_k: int, activation: str, query_norm: str,
                          running=None, update: bool = False):
    """``product_key`` (same arguments, result and gradients) for CPU float32 / float64 tensors:
    the queries and sub-key scores in torch, the selection with its softmax (``route_cpu``) and
    the experts (``experts_cpu``) on numba kernels. Raises like ``cpu.check_tensors`` for tensors it
    cannot run."""
    cpu.check_tensors(x, w_query, sub_keys, w_in, w_out, b_out)
    q = queries(x, w_query, query_norm, running, update)
    B, H, D = q.shape
    s = torch.einsum("bhtc,htnc->bhtn", q.reshape(B, H, 2, D // 2), sub_keys)            # (B, H, 2, n)
    p, experts = route_cpu(s, top_k)
    y = experts_cpu(x, p.reshape(B, H * top_k), w_in, w_out, experts.reshape(B, H * top_k), activation) + b_out
    return y, experts
