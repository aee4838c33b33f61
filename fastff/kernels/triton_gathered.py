"""Differentiable ops over gathered weight rows as Triton kernels (the GPU twin of
``fastff.kernels.gathered``): ``gathered_dots`` and ``gathered_combine`` built by
``gathered_autograd.GatheredOps`` on three kernels — dots, combine, and ``row_sums`` (the weight
gradient of both: row e = Σ c[r, s] · v[r] over the pairs with idx[r, s] = e; rows no pair uses
stay zero) — plus ``bias_sums`` for a bias gathered with the same index.

Forward and backward are O(S·F) per row: the input gradient of one op is the other op. Each
program takes ``BLOCK_ROWS`` rows; a row loads its own weight rows (rows that share a weight row
share it through the cache). ``row_sums`` sorts the (row, slot) pairs by weight row, cuts every
weight row's pairs into chunks of ``CHUNK`` and adds each chunk's sum atomically, so a row that
every input reaches (a tree's root) is summed by many programs. Inputs of any float dtype,
accumulated in float32 (float64 for float64); outputs in the input's dtype, weight gradients in
the weight's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gathered_autograd import GatheredOps

BLOCK_ROWS = 32
BLOCK_F = 64
CHUNK = 32


def acc_dtype(t: torch.Tensor):
    """Accumulate in float64 for float64 tensors, else in float32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def acc_torch_dtype(t: torch.Tensor) -> torch.dtype:
    """``acc_dtype`` as a torch dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@triton.jit
def _dots_kernel(v, w, idx, out, B, S, F, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rm = rows < B
    r = tl.load(idx + rows * S + s, mask=rm, other=0)
    acc = tl.zeros((BLOCK_B, BLOCK), dtype=ACC)
    for start in range(0, F, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = rm[:, None] & (offs < F)[None, :]
        acc += (tl.load(v + rows[:, None] * F + offs[None, :], mask=m, other=0.0).to(ACC)
                * tl.load(w + r[:, None] * F + offs[None, :], mask=m, other=0.0).to(ACC))
    tl.store(out + rows * S + s, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=rm)


@triton.jit
def _combine_kernel(c, w, idx, out, B, S, F, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rm, fm = rows < B, offs < F
    acc = tl.zeros((BLOCK_B, BLOCK), dtype=ACC)
    for s in range(S):
        r = tl.load(idx + rows * S + s, mask=rm, other=0)
        cs = tl.load(c + rows * S + s, mask=rm, other=0.0).to(ACC)
        acc += cs[:, None] * tl.load(w + r[:, None] * F + offs[None, :], mask=rm[:, None] & fm[None, :],
                                     other=0.0).to(ACC)
    tl.store(out + rows[:, None] * F + offs[None, :], acc.to(out.dtype.element_ty), mask=rm[:, None] & fm[None, :])


@triton.jit
def _row_sums_kernel(c, v, order, chunk_row, chunk_start, chunk_end, gw, S, F,
                     ACC: tl.constexpr, CHUNK_P: tl.constexpr, BLOCK: tl.constexpr):
    ch = tl.program_id(0)
    row = tl.load(chunk_row + ch)
    js = tl.load(chunk_start + ch) + tl.arange(0, CHUNK_P)
    jm = js < tl.load(chunk_end + ch)
    pair = tl.load(order + js, mask=jm, other=0)            # (row, slot) pairs as row * S + slot
    cs = tl.load(c + pair, mask=jm, other=0.0).to(ACC)
    src = pair // S
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    fm = offs < F
    tile = tl.load(v + src[:, None] * F + offs[None, :], mask=jm[:, None] & fm[None, :], other=0.0).to(ACC)
    tl.atomic_add(gw + row * F + offs, tl.sum(cs[:, None] * tile, axis=0), mask=fm)


def _dots(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, S = idx.shape
    out = torch.empty(B, S, dtype=v.dtype, device=v.device)
    if B and S:
        _dots_kernel[(triton.cdiv(B, BLOCK_ROWS), S)](v.contiguous(), w.contiguous(), idx.contiguous(), out, B, S,
                                                     v.shape[1], ACC=acc_dtype(v), BLOCK_B=BLOCK_ROWS, BLOCK=BLOCK_F)
    return out


def _combine(c: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    (B, S), F = idx.shape, w.shape[1]
    out = (torch.empty if S else torch.zeros)(B, F, dtype=c.dtype, device=c.device)
    if B and S and F:
        _combine_kernel[(triton.cdiv(B, BLOCK_ROWS), triton.cdiv(F, BLOCK_F))](
            c.contiguous(), w.contiguous(), idx.contiguous(), out, B, S, F, ACC=acc_dtype(c), BLOCK_B=BLOCK_ROWS,
            BLOCK=BLOCK_F)
    return out


def row_sums(c: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, F) in ``dtype``: row e = Σ c[r, s] · v[r] over the pairs with idx[r, s] = e.
    c (B, S), v (B, F), idx (B, S) long in [0, rows)."""
    F = v.shape[1]
    gw = torch.zeros(rows, F, dtype=acc_torch_dtype(v), device=v.device)
    flat = idx.reshape(-1)
    if flat.numel() and F:
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=rows)
        starts = torch.cumsum(counts, 0) - counts
        chunks = (counts + CHUNK - 1) // CHUNK
        total = int(chunks.sum())                       # the grid size: one device sync
        chunk_row = torch.repeat_interleave(torch.arange(rows, device=v.device), chunks, output_size=total)
        first = torch.cumsum(chunks, 0) - chunks
        chunk_start = starts[chunk_row] + (torch.arange(total, device=v.device) - first[chunk_row]) * CHUNK
        chunk_end = (starts + counts)[chunk_row]
        _row_sums_kernel[(total, triton.cdiv(F, BLOCK_F))](
            c.contiguous(), v.contiguous(), order, chunk_row, chunk_start, chunk_end, gw, idx.shape[1], F,
            ACC=acc_dtype(v), CHUNK_P=CHUNK, BLOCK=BLOCK_F)
    return gw.to(dtype)


def bias_sums(c: torch.Tensor, idx: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows,) in ``dtype``: entry e = Σ c[r, s] over the pairs with idx[r, s] = e (a bias gradient)."""
    acc = torch.zeros(rows, dtype=acc_torch_dtype(c), device=c.device)
    return acc.index_add_(0, idx.reshape(-1), c.reshape(-1).to(acc.dtype)).to(dtype)


def _check(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, name: str) -> None:
    if len({v.device, w.device, idx.device}) != 1:
        raise ValueError(f"{name}: tensors on different devices ({v.device}, {w.device}, {idx.device})")


# indices are not range-checked here (that would sync the device): they come from the walks
_OPS = GatheredOps(_dots, _combine, row_sums, _check)
gathered_dots, gathered_combine = _OPS.gathered_dots, _OPS.gathered_combine
