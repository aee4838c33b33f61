"""Localised optimisation against leaf starvation in deep trees: ``LocalSGD`` and ``LocalAdam``.

A deep tree starves its leaves of data: with a batch of B rows a leaf of a depth-d FFF sees
about B / 2**d of them, so its gradient is a noisy estimate from very few rows ("shrinking
batch"). The local optimisers give every *block* — an FFF leaf (rows of w1, b1, w2, b2), an FFF
node (rows of node_w, node_b) or a NeuronTree neuron (rows of w_in, b_in, w_out) — its own batch:

- each step, the block's gradient is added to an accumulator;
- the block is stepped only once its usage since its last step reaches ``local_batch_size``
  (lbs), with the accumulated gradient rescaled by ``lbs / usage``, then the accumulator is
  cleared. The step therefore always represents exactly lbs rows' worth of gradient;
- usage comes from the layers' own counters, so the layers must be built with ``usage``:
  ``FFF(..., usage="soft")`` (summed mixture weights / reach; hard_path: gates) or ``"hard"``
  (row counts), ``NeuronTree(..., usage="hard")``;
- every other parameter (biases outside the blocks, master leaf, other layers) is stepped every
  step like plain SGD / Adam.

Each block keeps its own Adam moments and step count (bias correction per block).
``fused=True`` (default): on CPU float32/float64 parameters one numba pass per block parameter
does the accumulation and the ready rows' update in place; ``fused=False`` (and other devices):
the same maths with torch row gathers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._checks import check_fraction
from ..kernels.numba.local_step import local_step
from ..threads import follow_torch_threads
from ..layers.families import family_of


def _block_params(model: nn.Module) -> dict[nn.Parameter, tuple[nn.Module, str]]:
    """Parameter -> (layer, name of the usage buffer whose entries index its leading dims), for
    the blocks of every layer whose family declares them (``Family.local_blocks``)."""
    blocks = {}
    for module in model.modules():
        fam = family_of(module)
        if fam is None or not fam.local_blocks:
            continue
        if module.usage is None:
            raise ValueError(f"local optimisation needs usage tracking; build the {type(module).__name__} "
                             f"with usage={fam.local_usage!r} (got usage=None)")
        for buffer, names in fam.local_blocks:
            for name in names:
                if getattr(module, name) is not None:
                    blocks[getattr(module, name)] = (module, buffer)
    return blocks


class _Local(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, defaults: dict, local_batch_size: float, fused: bool):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the optimiser reads its layers' usage), "
                            f"got {type(model).__name__}")
        check_fraction("lr", defaults["lr"], high=float("inf"))
        self.local_batch_size = check_fraction("local_batch_size", local_batch_size, high=float("inf"))
        if self.local_batch_size <= 0:
            raise ValueError(f"local_batch_size must be > 0, got {local_batch_size}")
        self._blocks = _block_params(model)
        self.fused = bool(fused)
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        for p, (module, buffer) in self._blocks.items():
            self.state[p]["base"] = getattr(module, buffer).detach().flatten().clone()

    @torch.no_grad()
    @follow_torch_threads
    def step(self, closure=None):
        """Accumulate every block's gradient; step the blocks whose usage reached the local batch
        size (and every non-block parameter)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p not in self._blocks:
                    self._update(p, None, p.grad, group)
                    continue
                module, buffer = self._blocks[p]
                usage = getattr(module, buffer).detach().flatten().to(p.dtype)
                state = self.state[p]
                base = state["base"]
                base.copy_(torch.where(usage < base, torch.zeros_like(base), base))  # counters were reset
                pending = usage - base                                  # (blocks,)
                acc = state.setdefault("acc", torch.zeros_like(p)).view(len(usage), -1)
                grad = p.grad.reshape(len(usage), -1)
                if self.fused and p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64):
                    ready = self._fused_step(p, grad, acc, pending, group)
                else:
                    acc += grad
                    ready = (pending >= self.local_batch_size).nonzero()[:, 0]
                    if len(ready):
                        scale = (self.local_batch_size / pending[ready]).unsqueeze(1)
                        self._update(p, ready, acc[ready] * scale, group)
                        acc[ready] = 0
                base[ready] = usage[ready]
        return loss

    def _fused_step(self, p, grad, acc, pending, group) -> torch.Tensor:
        """One numba pass over a block parameter viewed (blocks, cols): accumulate, and step the
        ready rows in place (same maths as the torch path). -> the ready rows (long)."""
        flat = p.view(acc.shape)
        adam = isinstance(self, LocalAdam)
        state = self._adam_state(p, flat) if adam else {}
        (b1, b2), eps = group.get("betas", (0.0, 0.0)), group.get("eps", 0.0)
        empty = np.empty((0, 0), dtype=_np(flat).dtype)
        local_step(_np(flat), _np(grad.contiguous()), _np(acc), _np(state["exp_avg"]) if adam else empty,
                       _np(state["exp_avg_sq"]) if adam else empty,
                       _np(state["steps"]) if adam else np.empty(0, dtype=_np(flat).dtype),
                       _np(pending.contiguous()), self.local_batch_size, group["lr"], b1, b2, eps, adam)
        return (pending >= self.local_batch_size).nonzero()[:, 0]

    def _update(self, p, rows, grad, group):
        """Step ``p`` (rows ``rows`` of its (blocks, -1) view, or all of it if None) by ``grad``."""
        raise NotImplementedError


def _np(t: torch.Tensor) -> np.ndarray:
    """Numpy view sharing memory (in-place kernel updates land in the tensor)."""
    assert t.is_contiguous()
    return t.detach().numpy()


class LocalSGD(_Local):
    """Localised SGD: ``block -= lr · acc · lbs / usage`` once a block's usage since its last
    step reaches ``local_batch_size``; other parameters ``p -= lr · grad`` every step."""

    def __init__(self, model: nn.Module, lr: float, local_batch_size: float, fused: bool = True):
        super().__init__(model, {"lr": lr}, local_batch_size, fused)

    def _update(self, p, rows, grad, group):
        if rows is None:
            p.add_(grad, alpha=-group["lr"])
        else:
            p.view(-1, grad.shape[1]).index_add_(0, rows, grad, alpha=-group["lr"])


class LocalAdam(_Local):
    """Localised Adam: the rescaled accumulated gradient of a ready block feeds that block's own
    Adam moments (bias correction with the block's own step count). Non-block parameters: Adam."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, local_batch_size: float = 64,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = True):
        for i, beta in enumerate(betas):
            check_fraction(f"betas[{i}]", beta)
        super().__init__(model, {"lr": lr, "betas": tuple(betas), "eps": check_fraction("eps", eps)},
                         local_batch_size, fused)

    def _adam_state(self, p, flat: torch.Tensor) -> dict:
        """Moments shaped like the (blocks, cols) view ``flat`` of ``p``, and per-block steps."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(flat)
            state["exp_avg_sq"] = torch.zeros_like(flat)
            state["steps"] = flat.new_zeros(flat.shape[0])
        return state

    def _update(self, p, rows, grad, group):
        flat = p.view(1, -1) if rows is None else p.view(-1, grad.shape[1])
        grad = grad.reshape(1, -1) if rows is None else grad
        state = self._adam_state(p, flat)
        rows = torch.zeros(1, dtype=torch.long, device=p.device) if rows is None else rows
        (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
        steps = state["steps"][rows] + 1
        m = state["exp_avg"][rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2 ** steps)[:, None]).sqrt_().add_(eps)
        flat.index_add_(0, rows, m / denom * (-lr / (1 - b1 ** steps))[:, None])
        state["exp_avg"][rows] = m
        state["exp_avg_sq"][rows] = v
        state["steps"][rows] = steps
