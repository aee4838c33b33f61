"""Multi-process (``torch.distributed`` / DistributedDataParallel) training helpers.

What DDP gets right by itself, and what needs these helpers (every rank holds an equal share
of the global batch, e.g. a ``DistributedSampler`` with ``drop_last=True``):

- Prediction loss and ``hardening_loss``: both are means over the local rows. DDP averages the
  gradients over ranks, which gives exactly the gradient of the global-batch loss. The *value*
  of the loss on each rank is local; its mean over ranks is the global value.
- ``load_balancing_loss`` = ``alpha · N · Σ_i f_i · P_i``: ``f_i`` (the fraction of rows
  whose hard route ends in leaf / expert ``i``, no gradient) must be the global fraction, so
  call ``all_reduce_aux(model)`` after the forward and before computing the loss. ``P_i``
  (mean soft routing probability, with gradient) stays local: the loss is linear in it, so
  DDP's gradient average again yields the exact global-batch gradient.
- Usage counters (``FFF(usage=...)`` buffers ``leaf_usage`` / ``node_usage``): each rank
  counts only its own rows, and DDP by default overwrites every rank's buffers with rank 0's
  at each forward (``broadcast_buffers`` / ``forward_sync_buffers``), losing the other ranks'
  counts. Either call ``sync_usage(model)`` once (hooks make every training forward add the
  *global* counts on all ranks, so all ranks hold identical, global counters, as LocalSGD-style
  optimizers need; DDP's buffer sync is then harmless), or build DDP with
  ``forward_sync_buffers=False`` (older torch: ``broadcast_buffers=False``) and call
  ``all_reduce_usage(model)`` when the global counts are needed.
- ``train_hardened=True`` leaves the decision nodes without gradient: build DDP with
  ``find_unused_parameters=True`` then.

All helpers are no-ops when ``torch.distributed`` is not initialised (single process).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _usage_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b for name, b in module.named_buffers(recurse=False) if name.endswith("_usage")]


def all_reduce_aux(model: nn.Module, group=None) -> None:
    """Average every gradient-free ``aux`` record (the hard route fractions ``f_i``) of every
    layer over the ranks, in place. Call after the training forward, before the losses."""
    if not _active(group):
        return
    world = dist.get_world_size(group)
    for m in model.modules():
        for key, value in getattr(m, "aux", {}).items():
            if isinstance(value, torch.Tensor) and not value.requires_grad:
                total = value.clone()
                dist.all_reduce(total, group=group)
                m.aux[key] = total / world


def all_reduce_usage(model: nn.Module, group=None) -> None:
    """Replace every usage counter by its sum over the ranks, in place (one-shot: use with
    DDP's forward buffer sync off; reset the counters on all ranks before calling it again)."""
    if not _active(group):
        return
    for m in model.modules():
        for buf in _usage_buffers(m):
            dist.all_reduce(buf, group=group)


def sync_usage(model: nn.Module, group=None) -> list:
    """Make every training forward of each layer with usage counters add the global (all-rank)
    increment instead of the local one, via forward hooks. Returns the hook handles
    (``handle.remove()`` undoes it). Every rank must run the same forwards (as DDP requires)."""
    handles = []
    for m in model.modules():
        if not _usage_buffers(m):
            continue

        def before(module, args):
            if module.training and _active(group):
                module._usage_before = [b.clone() for b in _usage_buffers(module)]

        def after(module, args, output):
            saved = module.__dict__.pop("_usage_before", None)
            if saved is None:
                return
            for buf, old in zip(_usage_buffers(module), saved):
                delta = buf - old
                dist.all_reduce(delta, group=group)
                buf.copy_(old + delta)

        handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    return handles
