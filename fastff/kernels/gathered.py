"""Differentiable ops over gathered weight rows on the numba kernels (``numba/gathered.py``), CPU
float32 / float64: each of B rows reads S rows of a weight table w (R, F) through idx (B, S) long.

- ``gathered_dots(x (B, I), w (R, I), idx) -> a (B, S)``, a[r, s] = x[r] · w[idx[r, s]];
- ``gathered_combine(c (B, S), w (R, O), idx) -> y (B, O)``, y[r] = Σ_s c[r, s] · w[idx[r, s]].

Forward and backward are O(S·F) per row: the input gradient of one is the other op, the weight
gradient is a dense (R, F) tensor whose rows are summed pair by pair, the pairs grouped by row
(one writer per row; zero in the rows no pair uses). No (B, S, F) tensor exists. Equal to the torch
expressions ``einsum("bi,bsi->bs", x, w[idx])`` / ``einsum("bs,bso->bo", c, w[idx])``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..threads import follow_torch_threads
from . import cpu
from .numba import gathered as kernel
from .numba.common import group_rows

BLOCKS_PER_THREAD = 4   # weight-row ranges per thread in the weight-gradient kernel


def weight_blocks(starts: np.ndarray) -> np.ndarray:
    """Row ranges (T + 1,) for ``kernel.grouped_sums``: ``BLOCKS_PER_THREAD`` per thread, cut so each
    holds about as many pairs plus rows (the rows it writes). starts (R + 1,) from ``group_rows``."""
    n = starts.shape[0] - 1
    cost = starts + np.arange(n + 1)
    blocks = min(n, BLOCKS_PER_THREAD * torch.get_num_threads())
    cuts = np.searchsorted(cost, np.arange(1, blocks) * cost[-1] // blocks)
    return np.concatenate(([0], np.minimum(cuts, n), [n])).astype(np.int64)


def _dots(v: np.ndarray, w: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(B, S) = v[r] · w[idx[r, s]]."""
    out = np.zeros(idx.shape, v.dtype)
    if idx.size:
        kernel.dots(v, w, idx, out)
    return out


def _combine(c: np.ndarray, w: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(B, F) = Σ_s c[r, s] · w[idx[r, s]]."""
    out = np.zeros((idx.shape[0], w.shape[1]), w.dtype)
    if idx.size:
        kernel.combine(c, w, idx, out)
    return out


def _row_grads(c: np.ndarray, v: np.ndarray, idx: np.ndarray, rows: int) -> torch.Tensor:
    """(rows, F) gradient of the weight table: row e = Σ c[r, s] · v[r] over idx[r, s] = e."""
    gw = np.zeros((rows, v.shape[1]), v.dtype)
    if idx.size:
        order, starts = group_rows(idx.reshape(-1), rows)
        kernel.grouped_sums(np.ascontiguousarray(c).reshape(-1), v, idx.shape[1], order, starts,
                            weight_blocks(starts), gw)
    return torch.from_numpy(gw)


class _Dots(torch.autograd.Function):
    """x (B, I), w (R, I), idx (B, S) long -> (B, S) = x[r] · w[idx[r, s]]."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, x, w, idx):
        ctx.save_for_backward(x, w, idx)
        return torch.from_numpy(_dots(cpu._np(x), cpu._np(w), cpu._np(idx)))

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g):
        x, w, idx = (cpu._np(t) for t in ctx.saved_tensors)
        g = cpu._np(g)
        gx = torch.from_numpy(_combine(g, w, idx)) if ctx.needs_input_grad[0] else None
        gw = _row_grads(g, x, idx, w.shape[0]) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class _Combine(torch.autograd.Function):
    """c (B, S), w (R, O), idx (B, S) long -> (B, O) = Σ_s c[r, s] · w[idx[r, s]]."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, c, w, idx):
        ctx.save_for_backward(c, w, idx)
        return torch.from_numpy(_combine(cpu._np(c), cpu._np(w), cpu._np(idx)))

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g):
        c, w, idx = (cpu._np(t) for t in ctx.saved_tensors)
        g = cpu._np(g)
        gc = torch.from_numpy(_dots(g, w, idx)) if ctx.needs_input_grad[0] else None
        gw = _row_grads(c, g, idx, w.shape[0]) if ctx.needs_input_grad[1] else None
        return gc, gw, None


def _check(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, name: str) -> None:
    """Shapes, dtypes and index range of a gathered op (raises like ``cpu.check_tensors``)."""
    cpu.check_tensors(v, w)
    if v.dim() != 2 or w.dim() != 2 or idx.dim() != 2 or idx.dtype != torch.long or not idx.is_cpu:
        raise ValueError(f"{name} takes 2-D tensors and a 2-D CPU long index; got {tuple(v.shape)}, "
                         f"{tuple(w.shape)}, {tuple(idx.shape)} {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.shape[0]):
        raise IndexError(f"{name}: index out of range for a table of {w.shape[0]} rows")


def gathered_dots(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a (B, S) = x[r] · w[idx[r, s]]. x (B, I), w (R, I), idx (B, S) long in [0, R); differentiable
    in x and w."""
    _check(x, w, idx, "gathered_dots")
    if x.shape[0] != idx.shape[0] or x.shape[1] != w.shape[1]:
        raise ValueError(f"gathered_dots: shapes {tuple(x.shape)}, {tuple(w.shape)}, {tuple(idx.shape)} do not match")
    return _Dots.apply(x, w, idx)


def gathered_combine(c: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y (B, O) = Σ_s c[r, s] · w[idx[r, s]]. c (B, S), w (R, O), idx (B, S) long in [0, R);
    differentiable in c and w."""
    _check(c, w, idx, "gathered_combine")
    if c.shape != idx.shape:
        raise ValueError(f"gathered_combine: c {tuple(c.shape)} and idx {tuple(idx.shape)} differ in shape")
    return _Combine.apply(c, w, idx)
