"""Capacity diagnostics: how much of a routed feedforward's width its inputs actually reach.

For every feedforward whose family routes (``Family.routing``: FFF, NeuronTree, MoE, ...), in
eval mode, over the rows a model sees while the diagnostics are recording:

- per routing level (root first; the last level = leaves / deepest nodes / experts): the
  fraction of units reached, the entropy of the row distribution over the level's units
  (nats) and its perplexity as a fraction of the level size (1 = uniform);
- per binary decision level (a level whose next one is twice as large): the mean absolute
  deviation from a 50/50 split, ``|right / reached - 1/2|``, over the nodes reached by at
  least ``MIN_ROWS_FOR_BALANCE`` rows, and the fraction of rows the root sends right;
- dead units: the fraction of all units (every level) that no row reached.

Usage: ``with CapacityRecorder(model) as rec: model(x)``; ``rec.summary()`` is JSON.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.families import family_of, feedforwards

MIN_ROWS_FOR_BALANCE = 4


class _Counts:
    """Per level: rows reaching each unit (size,) and, for binary levels, rows going right."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.reach = [torch.zeros(n, dtype=torch.long) for n in sizes]
        self.right = [torch.zeros(n, dtype=torch.long) if t + 1 < len(sizes) and sizes[t + 1] == 2 * n else None
                      for t, n in enumerate(sizes)]
        self.rows = 0

    def add(self, units: list[torch.Tensor]) -> None:
        self.rows += units[0].shape[0]
        flat = [u.reshape(-1).cpu() for u in units]
        for t, u in enumerate(flat):
            self.reach[t] += torch.bincount(u, minlength=self.sizes[t])
            if self.right[t] is not None:
                self.right[t] += torch.bincount(u, weights=(flat[t + 1] % 2).double(), minlength=self.sizes[t]).long()

    def summary(self) -> dict:
        levels = []
        for t, (n, reach) in enumerate(zip(self.sizes, self.reach)):
            total = reach.sum().item()
            p = reach.double() / max(1, total)
            entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
            level = {"size": n, "reached": (reach > 0).double().mean().item(), "entropy": entropy,
                     "perplexity_frac": math.exp(entropy) / n}
            if self.right[t] is not None:
                seen = reach >= MIN_ROWS_FOR_BALANCE
                frac = self.right[t][seen].double() / reach[seen].double()
                level["imbalance"] = (frac - 0.5).abs().mean().item() if seen.any() else None
            levels.append(level)
        units = sum(self.sizes)
        out = {"rows": self.rows, "levels": levels, "deepest_reached": levels[-1]["reached"],
               "dead": sum((r == 0).sum().item() for r in self.reach) / units}
        if self.right[0] is not None and self.reach[0].sum() > 0:
            out["root_right"] = (self.right[0].sum() / self.reach[0].sum()).item()
        return out


class CapacityRecorder:
    """Context manager: while open, every eval-mode forward of ``model``'s routed feedforwards
    is counted (forward pre-hooks; the forward itself is unchanged). ``summary()`` -> one dict
    per routed feedforward, in module order: {"layer", "family", "rows", "levels", ...} (see
    the module docstring)."""

    def __init__(self, model: nn.Module):
        self.layers = [(i, m, f) for i, m in enumerate(feedforwards(model)) if (f := family_of(m)).routing is not None]
        self.counts: dict[int, _Counts] = {}
        self._handles = []

    def __enter__(self) -> "CapacityRecorder":
        for i, module, fam in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._hook(i, fam)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int, fam):
        def fn(module, inputs):
            if module.training:
                return
            with torch.no_grad():
                r = fam.routing(module, inputs[0].reshape(-1, module.in_features))
            self.counts.setdefault(i, _Counts(list(r.sizes))).add(r.units)
        return fn

    def summary(self) -> list[dict]:
        return [{"layer": i, "family": fam.name, **self.counts[i].summary()}
                for i, _, fam in self.layers if i in self.counts]


def worst(summary: list[dict]) -> dict:
    """The headline numbers over layers: the lowest deepest-level reach and the highest dead fraction."""
    if not summary:
        return {}
    return {"deepest_reached_min": min(s["deepest_reached"] for s in summary),
            "dead_max": max(s["dead"] for s in summary)}
