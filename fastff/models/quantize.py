"""int8 dynamic quantization, what a CPU user tries first (``torch.ao.quantization.quantize_dynamic``:
int8 weights, activations quantized per call), applied to the ``nn.Linear`` layers outside
fastff's feedforwards: all of a dense model, the attention and other projections of a converted
one; with ``feedforwards=True`` also inside the feedforwards whose family allows it
(``Family.int8``: the dense ones)."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..layers.families import FAMILIES

__all__ = ["quantize_int8", "int8_linear_names"]


def _kept(feedforwards: bool) -> tuple[type, ...]:
    """Layer classes whose ``nn.Linear`` layers stay float."""
    return tuple(f.layer for f in FAMILIES.values() if not (feedforwards and f.int8))


def int8_linear_names(model: nn.Module, feedforwards: bool = False) -> list[str]:
    """Module paths of the ``nn.Linear`` layers of ``model`` that ``quantize_int8`` converts."""
    keep = _kept(feedforwards)
    inside: list[str] = []
    names = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{p}.") for p in inside):
            continue
        if isinstance(m, keep):
            inside.append(name)
        elif isinstance(m, nn.Linear):
            names.append(name)
    return names


def quantize_int8(model: nn.Module, feedforwards: bool = False) -> nn.Module:
    """A copy of ``model`` (eval mode) whose ``int8_linear_names`` layers are dynamically quantized
    to int8 (per-tensor weights, CPU). fastff feedforwards stay float (a pruned ``DenseFF`` too),
    unless ``feedforwards``: then those whose family has ``int8=True`` (``DenseFF``) are quantized."""
    names = set(int8_linear_names(model, feedforwards))
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear outside fastff layers to quantize")
    with warnings.catch_warnings():                  # torch.ao's eager quantization warns it is deprecated
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), names, torch.qint8)
