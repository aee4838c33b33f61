"""Differentiable ops over gathered weight rows on the numba kernels (``numba/gathered.py``), CPU
float32 / float64: each of B rows reads S rows of a weight table w (R, F) through idx (B, S) long.

- ``gathered_dots(x (B, I), w (R, I), idx) -> a (B, S)``, a[r, s] = x[r] · w[idx[r, s]];
- ``gathered_combine(c (B, S), w (R, O), idx) -> y (B, O)``, y[r] = Σ_s c[r, s] · w[idx[r, s]].

Forward and backward are O(S·F) per row (``gathered_autograd.GatheredOps`` on the numba
primitives): the input gradient of one is the other op, the weight gradient is a dense (R, F)
tensor whose rows are summed pair by pair, the pairs grouped by row (one writer per row; zero in
the rows no pair uses). No (B, S, F) tensor exists. Equal to the torch expressions
``einsum("bi,bsi->bs", x, w[idx])`` / ``einsum("bs,bso->bo", c, w[idx])``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..threads import follow_torch_threads
from . import cpu
from .gathered_autograd import GatheredOps
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


@follow_torch_threads
def _dots(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, S) = v[r] · w[idx[r, s]]."""
    out = np.zeros(idx.shape, cpu._np(v).dtype)
    if idx.numel():
        kernel.dots(cpu._np(v), cpu._np(w), cpu._np(idx), out)
    return torch.from_numpy(out)


@follow_torch_threads
def _combine(c: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, F) = Σ_s c[r, s] · w[idx[r, s]]."""
    out = np.zeros((idx.shape[0], w.shape[1]), cpu._np(w).dtype)
    if idx.numel():
        kernel.combine(cpu._np(c), cpu._np(w), cpu._np(idx), out)
    return torch.from_numpy(out)


@follow_torch_threads
def _row_sums(c: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, F) gradient of the weight table: row e = Σ c[r, s] · v[r] over idx[r, s] = e."""
    va = cpu._np(v)
    gw = np.zeros((rows, va.shape[1]), va.dtype)
    if idx.numel():
        order, starts = group_rows(cpu._np(idx).reshape(-1), rows)
        kernel.grouped_sums(cpu._np(c).reshape(-1), va, idx.shape[1], order, starts, weight_blocks(starts), gw)
    return torch.from_numpy(gw).to(dtype)


def _check(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, name: str) -> None:
    """CPU float32 / float64 tensors of one dtype, a CPU index in range (raises like ``cpu.check_tensors``)."""
    cpu.check_tensors(v, w)
    if not idx.is_cpu:
        raise ValueError(f"{name} takes a CPU index, got one on {idx.device}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.shape[0]):
        raise IndexError(f"{name}: index out of range for a table of {w.shape[0]} rows")


_OPS = GatheredOps(_dots, _combine, _row_sums, _check)
gathered_dots, gathered_combine = _OPS.gathered_dots, _OPS.gathered_combine
