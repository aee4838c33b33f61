"""Triton GPU kernels (backend ``"triton"``), inference and training; tested on CPU with
TRITON_INTERPRET=1.

Two paths, same results:

- *one row per program* (``fff_hard_rows``, ``neuron_tree_rows``; inference without gradient):
  a program walks the tree(s) of its row with chunked dot products over the input features and
  writes its output row — no races, no atomics;
- *blocks of rows* (``fff_hard_blocked``, ``neuron_tree_blocked``, and the training ops): a
  walk kernel (``BLOCK_ROWS`` rows per program, one tree per program) records each row's visited
  nodes and pre-activations, then the gathered-row ops of ``fastff.kernels.triton_gathered``
  evaluate the visited neurons / reached leaf. Differentiable: the walk's backward and the
  gathered ops' backwards touch only the visited weight rows, O(depth) per row. The routing
  options of NeuronTree (``route_bias``, ``gate``) run here.

``fff_hard`` / ``neuron_tree`` pick the row path below ``BLOCKED_FROM`` rows when no gradient is
needed and no routing option is set, else the blocked path. Training ops ``neuron_tree_paths``,
``fff_walk`` and ``fff_leaves`` have the interface of ``fastff.kernels.cpu``. Tensors must be
CUDA tensors, or CPU tensors when the Triton interpreter is on (``TRITON_INTERPRET=1`` set before
import). float32 / float64, and bfloat16 / float16 accumulated in float32. Activation codes are
``fastff.functional.ACTIVATION_CODES``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..functional import ACTIVATION_CODES, activation_code, fff_depth, get_activation, tree_levels, tree_table_rows
from . import routing
from .routing import needs_grad
from .triton_gathered import (BLOCK_ROWS, acc_dtype, acc_torch_dtype, bias_sums, gathered_combine, gathered_dots,
                              row_sums)

if list(ACTIVATION_CODES) != ["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "identity"]:
    raise ImportError("fastff.kernels.triton: ACTIVATION_CODES changed; update _act")
MAX_LEAF_WIDTH = 4096
# Batches from this size on take the blocked path at inference (a first guess until measured on a GPU:
# benchmarks/gpu_check.py times both paths at every batch size).
BLOCKED_FROM = 256
WALK_BLOCK_I = 64


@triton.jit
def _act(v, ACT: tl.constexpr):
    """Activation by ``ACTIVATION_CODES``; NaN in, NaN out (relu keeps NaN: v < 0 is false)."""
    if ACT == 0:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 1:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = 0.5 * v * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACT == 3:
        v = v * tl.sigmoid(v)
    elif ACT == 4:
        v = 2.0 * tl.sigmoid(2.0 * v) - 1.0
    elif ACT == 5:
        v = tl.sigmoid(v)
    return v


@triton.jit
def _go_right(a):
    """The routing rule: right iff the pre-activation ``a >= 0`` (NaN goes left)."""
    return a >= 0


@triton.jit
def _child_index(node, right):
    """Heap-order child of ``node``: ``2*node + 1 + right``."""
    return 2 * node + 1 + right.to(node.dtype)


@triton.jit
def _child(node, a):
    """The child of ``node`` the routing rule takes for pre-activation ``a``."""
    return _child_index(node, _go_right(a))


@triton.jit
def _dot_row(x_row, w_row, I, BLOCK_I: tl.constexpr, ACC: tl.constexpr):
    """Σ_i x_row[i] · w_row[i], accumulated in dtype ACC in chunks of BLOCK_I."""
    acc = tl.zeros((BLOCK_I,), dtype=ACC)
    for start in range(0, I, BLOCK_I):
        offs = start + tl.arange(0, BLOCK_I)
        m = offs < I
        acc += tl.load(x_row + offs, mask=m, other=0.0).to(ACC) * tl.load(w_row + offs, mask=m, other=0.0).to(ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def _fff_kernel(x, node_w, node_b, w1, b1, w2, b2, y, I, O, H,
                DEPTH: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr):
    row = tl.program_id(0)
    x_row = x + row * I
    node = 0
    gate = tl.full((), 1.0, ACC)
    for _ in range(DEPTH):
        logit = _dot_row(x_row, node_w + node * I, I, BLOCK_I, ACC) + tl.load(node_b + node).to(ACC)
        if GATED:
            gate = gate * tl.sigmoid(tl.abs(logit))
        node = _child(node, logit)
    leaf = node - ((1 << DEPTH) - 1)
    hs = tl.arange(0, BLOCK_H)
    hm = hs < H
    h = tl.zeros((BLOCK_H,), dtype=ACC)
    for start in range(0, I, BLOCK_I):                       # h = x · w1[leaf]  (I, H) tiles
        offs = start + tl.arange(0, BLOCK_I)
        im = offs < I
        xv = tl.load(x_row + offs, mask=im, other=0.0).to(ACC)
        tile = tl.load(w1 + leaf * I * H + offs[:, None] * H + hs[None, :], mask=im[:, None] & hm[None, :], other=0.0)
        h += tl.sum(xv[:, None] * tile.to(ACC), axis=0)
    h = _act(h + tl.load(b1 + leaf * H + hs, mask=hm, other=0.0).to(ACC), ACT)
    h = tl.where(hm, h, 0.0)
    for start in range(0, O, BLOCK_O):                       # y = h · w2[leaf] + b2[leaf]
        offs = start + tl.arange(0, BLOCK_O)
        om = offs < O
        tile = tl.load(w2 + leaf * H * O + hs[:, None] * O + offs[None, :], mask=hm[:, None] & om[None, :], other=0.0)
        out = tl.sum(h[:, None] * tile.to(ACC), axis=0) + tl.load(b2 + leaf * O + offs, mask=om, other=0.0)
        if GATED:
            out = out * gate
        tl.store(y + row * O + offs, out.to(y.dtype.element_ty), mask=om)


@triton.jit
def _neuron_tree_kernel(x, w_in, b_in, w_out, b_out, y, I, O, K, M,
                        LEVELS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr):
    row = tl.program_id(0)
    x_row = x + row * I
    lv = tl.arange(0, BLOCK_L)
    for start in range(0, O, BLOCK_O):                       # y starts as the output bias
        offs = start + tl.arange(0, BLOCK_O)
        om = offs < O
        init = tl.zeros((BLOCK_O,), dtype=ACC)
        if HAS_BIAS:
            init += tl.load(b_out + offs, mask=om, other=0.0).to(ACC)
        tl.store(y + row * O + offs, init.to(y.dtype.element_ty), mask=om)
    for k in range(K):
        node = 0
        nodes = tl.zeros((BLOCK_L,), dtype=tl.int32)
        hs = tl.zeros((BLOCK_L,), dtype=ACC)
        for t in range(LEVELS):                              # walk, remembering node and act per level
            a = _dot_row(x_row, w_in + (k * M + node) * I, I, BLOCK_I, ACC) + tl.load(b_in + k * M + node).to(ACC)
            nodes = tl.where(lv == t, node, nodes)
            hs = tl.where(lv == t, _act(a, ACT), hs)
            node = _child(node, a)
        lm = lv < LEVELS
        for start in range(0, O, BLOCK_O):                   # y += Σ_t h_t · w_out[k, node_t]
            offs = start + tl.arange(0, BLOCK_O)
            om = offs < O
            tile = tl.load(w_out + (k * M + nodes)[:, None] * O + offs[None, :], mask=lm[:, None] & om[None, :], other=0.0)
            part = tl.sum(hs[:, None] * tile.to(ACC), axis=0)
            prev = tl.load(y + row * O + offs, mask=om, other=0.0).to(ACC)
            tl.store(y + row * O + offs, (prev + part).to(y.dtype.element_ty), mask=om)


@triton.jit
def _walk_kernel(x, w, b, route_bias, flip, nodes, pre, B, I, K, M, T,
                 HAS_ROUTE_BIAS: tl.constexpr, HAS_FLIP: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_I: tl.constexpr):
    """Hard descent of tree ``program_id(1)`` for a block of rows: at each of T levels a row's
    pre-activation a = x·w[k·M + node] + b[k·M + node], decision right iff a + route_bias >= 0
    (flipped where ``flip``); writes nodes / pre (B, K, T)."""
    k = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rm = rows < B
    node = tl.zeros((BLOCK_B,), dtype=tl.int64)
    for t in range(T):
        r = k * M + node
        acc = tl.zeros((BLOCK_B, BLOCK_I), dtype=ACC)
        for start in range(0, I, BLOCK_I):
            offs = start + tl.arange(0, BLOCK_I)
            m = rm[:, None] & (offs < I)[None, :]
            acc += (tl.load(x + rows[:, None] * I + offs[None, :], mask=m, other=0.0).to(ACC)
                    * tl.load(w + r[:, None] * I + offs[None, :], mask=m, other=0.0).to(ACC))
        a = tl.sum(acc, axis=1) + tl.load(b + r, mask=rm, other=0.0).to(ACC)
        decision = a
        if HAS_ROUTE_BIAS:
            decision = a + tl.load(route_bias + r, mask=rm, other=0.0).to(ACC)
        out = (rows * K + k) * T + t
        tl.store(nodes + out, node, mask=rm)
        tl.store(pre + out, a.to(pre.dtype.element_ty), mask=rm)
        right = _go_right(decision)
        if HAS_FLIP:
            right = right ^ (tl.load(flip + out, mask=rm, other=0) != 0)
        node = _child_index(node, right)


def _walk(x, w, b, route_bias, flip, K: int, M: int, T: int):
    """(pre (B, K, T) in the accumulation dtype (float32 for half inputs), nodes (B, K, T) long) of
    K trees' hard descents. w (K·M, I), b (K·M,), route_bias (K·M,) or None, flip (B, K, T) bool or None."""
    B, I = x.shape
    pre = torch.empty(B, K, T, dtype=acc_torch_dtype(x), device=x.device)
    nodes = torch.empty(B, K, T, dtype=torch.long, device=x.device)
    if B and K and T:
        _walk_kernel[(triton.cdiv(B, BLOCK_ROWS), K)](
            x.contiguous(), w.contiguous(), b.contiguous(), b if route_bias is None else route_bias.contiguous(),
            nodes if flip is None else flip.contiguous().to(torch.int8), nodes, pre, B, I, K, M, T,
            HAS_ROUTE_BIAS=route_bias is not None, HAS_FLIP=flip is not None, ACC=acc_dtype(x), BLOCK_B=BLOCK_ROWS,
            BLOCK_I=WALK_BLOCK_I)
    return pre, nodes


class _Walk(torch.autograd.Function):
    """Hard descent of K trees, differentiable in the visited pre-activations.
    x (B, I), w (K·M, I), b (K·M,) -> (pre (B, K, T), nodes (B, K, T) long)."""

    @staticmethod
    def forward(ctx, x, w, b, route_bias, flip, K, M, T):
        pre, nodes = _walk(x, w, b, route_bias, flip, K, M, T)
        ctx.save_for_backward(x, w, nodes)
        ctx.neurons_per_tree, ctx.b_dtype = M, b.dtype
        ctx.mark_non_differentiable(nodes)
        return pre, nodes

    @staticmethod
    def backward(ctx, g, _):
        x, w, nodes = ctx.saved_tensors
        B, K, T = nodes.shape
        ids = tree_table_rows(nodes, ctx.neurons_per_tree).reshape(B, K * T)
        g = g.reshape(B, K * T)
        gx = gathered_combine(g, w, ids).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = row_sums(g, x, ids, w.shape[0], w.dtype) if ctx.needs_input_grad[1] else None
        gb = bias_sums(g, ids, w.shape[0], ctx.b_dtype) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None, None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x: torch.Tensor, activation: str | None, *tensors: torch.Tensor) -> None:
    """Activation name (unless None) and devices (CUDA, or any under the interpreter; one for all tensors)."""
    if activation is not None:
        activation_code(activation)
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"the triton backend needs CUDA tensors (got device {x.device}); on CPU, set "
                         f"TRITON_INTERPRET=1 before importing fastff to run it in Triton's interpreter")
    if any(t.device != x.device for t in tensors if t is not None):
        raise ValueError("the triton backend needs the input and all weights on one device")


def _check_rows(x: torch.Tensor, activation: str, *tensors: torch.Tensor) -> None:
    """``_check`` for the one-row-per-program kernels, which compute no gradients."""
    _check(x, activation, *tensors)
    if needs_grad(x, *tensors):
        raise ValueError("the one-row-per-program triton kernels compute no gradients, but autograd needs them here: "
                         "run under torch.no_grad() / torch.inference_mode(), or call fff_hard / neuron_tree "
                         "(the blocked path trains)")


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(1, n)), cap)


def _rows_path(x: torch.Tensor, *tensors) -> bool:
    """Whether an inference call takes the one-row-per-program kernels: few rows, no gradient."""
    return x.shape[0] < BLOCKED_FROM and not needs_grad(x, *tensors)


# ----------------------------------------------------------------------------- FFF

def fff_hard_rows(x, node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool = False) -> torch.Tensor:
    """Hard FFF inference, one row per program. x (B, I) -> (B, O); see ``reference.fff_hard``."""
    _check_rows(x, activation, node_w, node_b, w1, b1, w2, b2)
    L, I, H = w1.shape
    O = w2.shape[-1]
    if H > MAX_LEAF_WIDTH:
        raise ValueError(f"the one-row-per-program triton kernel supports leaf_width <= {MAX_LEAF_WIDTH}, got {H}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], O, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _fff_kernel[(x.shape[0],)](x, node_w.contiguous(), node_b.contiguous(), w1.contiguous(), b1.contiguous(),
                                   w2.contiguous(), b2.contiguous(), y, I, O, H, DEPTH=fff_depth(L),
                                   ACT=activation_code(activation), GATED=bool(gated), ACC=acc_dtype(x),
                                   BLOCK_I=_block(I, 128), BLOCK_H=_block(H, MAX_LEAF_WIDTH), BLOCK_O=_block(O, 128))
    return y


def fff_walk(x, node_w, node_b, flip):
    """Hard descent through FFF decision nodes (see ``functional.hard_path``), differentiable in
    the logits. x (B, I), node_w (N, I), node_b (N,), flip (B, d) bool -> (nodes (B, d) long, logits
    (B, d), float32 for half inputs)."""
    _check(x, None, node_w, node_b, flip)
    pre, nodes = _Walk.apply(x, node_w, node_b, None, flip[:, None], 1, node_w.shape[0], flip.shape[1])
    return nodes[:, 0], pre[:, 0]


def fff_leaves(x, w1, b1, w2, b2, gate, leaf, mask, activation: str):
    """gate · ((act(x·w1[leaf] + b1[leaf]) · mask) · w2[leaf] + b2[leaf]) on the gathered-row ops: the
    leaves' hidden units are rows of the (L·H, I) table w1ᵀ and of w2 as (L·H, O).
    x (B, I), gate (B,), leaf (B,) long, mask (B, H) or (1, H) -> (B, O)."""
    _check(x, activation, w1, b1, w2, b2, gate, leaf)
    (L, I, H), O = w1.shape, w2.shape[-1]
    ids = leaf[:, None] * H + torch.arange(H, device=x.device)                     # (B, H) hidden-unit rows
    pre = gathered_dots(x, w1.transpose(1, 2).reshape(L * H, I), ids) + b1.reshape(L * H)[ids]
    h = get_activation(activation)(pre) * mask
    return (gate[:, None] * (gathered_combine(h, w2.reshape(L * H, O), ids) + b2[leaf])).to(x.dtype)


def fff_hard_blocked(x, node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool = False) -> torch.Tensor:
    """Hard FFF forward on the blocked path (``routing.fff_hard_path`` on ``fff_walk`` /
    ``fff_leaves``, which check their inputs), differentiable (node gradients through the gate when
    ``gated``). x (B, I) -> (B, O)."""
    return routing.fff_hard_path(fff_walk, fff_leaves, x, node_w, node_b, w1, b1, w2, b2, activation,
                                 hardened=not gated)[0]


def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool = False) -> torch.Tensor:
    """Hard FFF forward. x (B, I) -> (B, O); see ``reference.fff_hard``. Row path below
    ``BLOCKED_FROM`` rows without gradient, else the blocked path."""
    weights = (node_w, node_b, w1, b1, w2, b2)
    path = fff_hard_rows if _rows_path(x, *weights) else fff_hard_blocked
    return path(x, *weights, activation, gated)


# ----------------------------------------------------------------------------- NeuronTree

def neuron_tree_rows(x, w_in, b_in, w_out, b_out, activation: str) -> torch.Tensor:
    """NeuronTree inference, one row per program. x (B, I) -> (B, O); see ``reference.neuron_tree``."""
    _check_rows(x, activation, w_in, b_in, w_out, b_out)
    K, M, I = w_in.shape
    O = w_out.shape[-1]
    levels = tree_levels(M)
    x = x.contiguous()
    y = torch.empty(x.shape[0], O, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _neuron_tree_kernel[(x.shape[0],)](
            x, w_in.contiguous(), b_in.contiguous(), w_out.contiguous(), b_out if b_out is not None else w_out, y,
            I, O, K, M, LEVELS=levels, HAS_BIAS=b_out is not None, ACT=activation_code(activation),
            ACC=acc_dtype(x), BLOCK_I=_block(I, 128), BLOCK_L=_block(levels, 64), BLOCK_O=_block(O, 128))
    return y


def _walk_trees(x, w_in, b_in, route_bias):
    """The walk ``routing.neuron_tree_visited`` takes: -> (pre (B, K, D+1), nodes (B, K, D+1))."""
    K, M, I = w_in.shape
    rb = None if route_bias is None else route_bias.reshape(K * M)
    return _Walk.apply(x, w_in.reshape(K * M, I), b_in.reshape(K * M), rb, None, K, M, tree_levels(M))


def neuron_tree_paths(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False,
                      preactivations: bool = False, straight_through: bool = False):
    """NeuronTree forward with O(K·(D+1)·(in+out)) forward and backward per row (blocked path).
    x (B, I), w_in (K, M, I), b_in (K, M), w_out (K, M, O), b_out (O,) or None -> (y (B, O), nodes
    (B, K, D+1) long), and the visited pre-activations (B, K, D+1) if ``preactivations``; same
    values and gradients as ``reference.neuron_tree_paths`` (``route_bias``, ``gate``,
    ``straight_through`` as there). Half
    inputs: pre-activations, activations and gates in float32, y in the input's dtype."""
    _check(x, activation, w_in, b_in, w_out, b_out, route_bias)
    y, nodes, pre = routing.neuron_tree_visited(_walk_trees, gathered_combine, x, w_in, b_in, w_out, b_out,
                                                activation, route_bias, gate, straight_through)
    return (y.to(x.dtype), nodes, pre) if preactivations else (y.to(x.dtype), nodes)


def neuron_tree_blocked(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False):
    """NeuronTree forward on the blocked path (``neuron_tree_paths``), differentiable. x (B, I) -> (B, O)."""
    return neuron_tree_paths(x, w_in, b_in, w_out, b_out, activation, route_bias, gate)[0]


def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False) -> torch.Tensor:
    """NeuronTree forward. x (B, I) -> (B, O); see ``reference.neuron_tree``. Row path below
    ``BLOCKED_FROM`` rows without gradient or routing option, else the blocked path."""
    weights = (w_in, b_in, w_out, b_out)
    if route_bias is None and not gate and _rows_path(x, *weights):
        return neuron_tree_rows(x, *weights, activation)
    return neuron_tree_blocked(x, *weights, activation, route_bias, gate)
