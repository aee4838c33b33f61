"""The two differentiable gathered-row ops, built once from a backend's three primitives.

Each of B rows reads S rows of a weight table w (R, F) through idx (B, S) long:

- ``dots(v (B, F), w (R, F), idx) -> a (B, S)``, a[r, s] = v[r] · w[idx[r, s]];
- ``combine(c (B, S), w (R, F), idx) -> y (B, F)``, y[r] = Σ_s c[r, s] · w[idx[r, s]];
- ``row_sums(c (B, S), v (B, F), idx, R, dtype) -> (R, F)``, row e = Σ c[r, s] · v[r] over the
  pairs with idx[r, s] = e (zero for rows no pair uses): the weight gradient of both ops.

The input gradient of one op is the other op, so a backend that provides the three primitives
gets forward and backward in O(S·F) per row (``"cpu"``: numba, ``"triton"``: Triton kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class GatheredOps:
    """``gathered_dots`` / ``gathered_combine`` (differentiable in their first two arguments) on the
    primitives ``dots``, ``combine``, ``row_sums``; ``check(v, w, idx, name)`` validates a call
    beyond the shapes (devices, dtypes, index range)."""

    dots: Callable
    combine: Callable
    row_sums: Callable
    check: Callable

    def __post_init__(self):
        # dots and combine are each other's input gradient; their weight gradients are row sums of
        # (the output gradient, the rows' inputs) for dots and of (the coefficients, the output gradient)
        # for combine
        functions = (self._function(self.dots, self.combine, lambda a, g: (g, a)),
                     self._function(self.combine, self.dots, lambda a, g: (a, g)))
        object.__setattr__(self, "_functions", functions)

    def _function(self, forward_op, input_grad_op, row_sums_args):
        """The autograd Function of ``forward_op(a, w, idx)``, differentiable in a and w."""
        row_sums = self.row_sums

        class Gathered(torch.autograd.Function):
            @staticmethod
            def forward(ctx, a, w, idx):
                ctx.save_for_backward(a, w, idx)
                return forward_op(a, w, idx)

            @staticmethod
            def backward(ctx, g):
                a, w, idx = ctx.saved_tensors
                ga = input_grad_op(g, w, idx).to(a.dtype) if ctx.needs_input_grad[0] else None
                gw = row_sums(*row_sums_args(a, g), idx, w.shape[0], w.dtype) if ctx.needs_input_grad[1] else None
                return ga, gw, None
        return Gathered

    def _check(self, v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, name: str) -> None:
        if v.dim() != 2 or w.dim() != 2 or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"{name} takes 2-D tensors and a 2-D long index; got {tuple(v.shape)}, "
                             f"{tuple(w.shape)}, {tuple(idx.shape)} {idx.dtype}")
        self.check(v, w, idx, name)

    def gathered_dots(self, v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """a (B, S) = v[r] · w[idx[r, s]]. v (B, F), w (R, F), idx (B, S) long in [0, R)."""
        self._check(v, w, idx, "gathered_dots")
        if v.shape[0] != idx.shape[0] or v.shape[1] != w.shape[1]:
            raise ValueError(f"gathered_dots: shapes {tuple(v.shape)}, {tuple(w.shape)}, {tuple(idx.shape)} "
                             "do not match")
        return self._functions[0].apply(v, w, idx)

    def gathered_combine(self, c: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """y (B, F) = Σ_s c[r, s] · w[idx[r, s]]. c (B, S), w (R, F), idx (B, S) long in [0, R)."""
        self._check(c, w, idx, "gathered_combine")
        if c.shape != idx.shape:
            raise ValueError(f"gathered_combine: c {tuple(c.shape)} and idx {tuple(idx.shape)} differ in shape")
        return self._functions[1].apply(c, w, idx)
