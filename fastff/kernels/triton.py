"""Triton GPU kernels for hard inference (backend ``"triton"``); tested on CPU with TRITON_INTERPRET=1.

One program per row: it walks the tree(s) with chunked dot products over the input features
and writes its output row, so there are no races and no atomics. Tensors must be CUDA tensors,
or CPU tensors when the Triton interpreter is on (``TRITON_INTERPRET=1`` set before import).
Same inference interface and semantics as ``fastff.kernels.vectorized``; inference only: it
computes no gradients and raises when autograd needs them. Activation codes are
``fastff.functional.ACTIVATION_CODES``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..functional import ACTIVATION_CODES, activation_code, fff_depth, tree_levels
from .routing import needs_grad

if list(ACTIVATION_CODES) != ["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "identity"]:
    raise ImportError("fastff.kernels.triton: ACTIVATION_CODES changed; update _act")
MAX_LEAF_WIDTH = 4096


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
def _child(node, a):
    """The routing rule: heap-order child of ``node``, right iff ``a >= 0``."""
    return 2 * node + 1 + (a >= 0).to(tl.int32)


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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x: torch.Tensor, activation: str, *tensors: torch.Tensor) -> None:
    activation_code(activation)
    if needs_grad(x, *tensors):
        raise ValueError("the triton backend computes no gradients, but autograd needs them here (an input or "
                         "weight requires grad): run under torch.no_grad() / torch.inference_mode(), or use "
                         "backend='torch' (or 'auto')")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"the triton backend needs CUDA tensors (got device {x.device}); on CPU, set "
                         f"TRITON_INTERPRET=1 before importing fastff to run it in Triton's interpreter")
    if any(t.device != x.device for t in tensors if t is not None):
        raise ValueError("the triton backend needs the input and all weights on one device")


def _acc(x: torch.Tensor):
    """Accumulate in float64 for float64 inputs, else in float32."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(1, n)), cap)


def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool = False) -> torch.Tensor:
    """Hard FFF inference. x (B, I) -> (B, O); see ``fastff.kernels.reference.fff_hard``."""
    _check(x, activation, node_w, node_b, w1, b1, w2, b2)
    L, I, H = w1.shape
    O = w2.shape[-1]
    if H > MAX_LEAF_WIDTH:
        raise ValueError(f"the triton backend supports leaf_width <= {MAX_LEAF_WIDTH}, got {H}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], O, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _fff_kernel[(x.shape[0],)](x, node_w.contiguous(), node_b.contiguous(), w1.contiguous(), b1.contiguous(),
                                   w2.contiguous(), b2.contiguous(), y, I, O, H, DEPTH=fff_depth(L),
                                   ACT=activation_code(activation), GATED=bool(gated), ACC=_acc(x), BLOCK_I=_block(I, 128), BLOCK_H=_block(H, MAX_LEAF_WIDTH),
                                   BLOCK_O=_block(O, 128))
    return y


def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str) -> torch.Tensor:
    """NeuronTree inference. x (B, I) -> (B, O); see ``fastff.kernels.reference.neuron_tree``."""
    _check(x, activation, w_in, b_in, w_out, b_out)
    K, M, I = w_in.shape
    O = w_out.shape[-1]
    levels = tree_levels(M)
    x = x.contiguous()
    y = torch.empty(x.shape[0], O, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _neuron_tree_kernel[(x.shape[0],)](
            x, w_in.contiguous(), b_in.contiguous(), w_out.contiguous(), b_out if b_out is not None else w_out, y,
            I, O, K, M, LEVELS=levels, HAS_BIAS=b_out is not None, ACT=activation_code(activation), ACC=_acc(x),
            BLOCK_I=_block(I, 128), BLOCK_L=_block(levels, 64), BLOCK_O=_block(O, 128))
    return y
