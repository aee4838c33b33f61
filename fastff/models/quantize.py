"""int8 dynamic quantization, what a CPU user tries first (``torch.ao.quantization.quantize_dynamic``:
int8 weights, activations quantized per call), applied to every ``nn.Linear`` outside fastff's
layers: all of a dense model, the attention and other projections of a converted one."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..layers.dense import DenseFF
from ..layers.fff import FFF
from ..layers.moe import MoE
from ..layers.neuron_tree import NeuronTree

__all__ = ["quantize_int8", "int8_linear_names", "FASTFF_LAYERS"]

FASTFF_LAYERS = (FFF, NeuronTree, MoE, DenseFF)


def int8_linear_names(model: nn.Module, keep: tuple[type, ...] = FASTFF_LAYERS) -> list[str]:
    """Module paths of the ``nn.Linear`` layers of ``model`` not inside a layer of a ``keep`` type."""
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


def quantize_int8(model: nn.Module, keep: tuple[type, ...] = FASTFF_LAYERS) -> nn.Module:
    """A copy of ``model`` (eval mode) whose ``int8_linear_names`` layers are dynamically quantized
    to int8 (per-tensor weights, CPU); layers of the ``keep`` types stay float (default: fastff's
    FFF, NeuronTree, MoE and DenseFF, e.g. a pruned FFN; pass ``keep=(FFF, NeuronTree, MoE)`` to
    quantize DenseFF feedforwards too)."""
    names = set(int8_linear_names(model, keep))
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear outside fastff layers to quantize")
    with warnings.catch_warnings():                  # torch.ao's eager quantization warns it is deprecated
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), names, torch.qint8)
