"""Dense feedforward baseline: Linear -> activation -> Linear."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import CheckedInput, check_choice, check_input, check_int
from ..functional import ACTIVATIONS, get_activation
from ..io import serializable


# What a dynamically quantized fc1 (torch.ao quantize_dynamic: packed int8 weights) takes as input.
_FLOAT32_CPU = torch.empty(0)


@serializable
class DenseFF(CheckedInput, nn.Module):
    """``y = W2 act(W1 x + b1) + b2``; x (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.hidden = check_int("hidden", hidden, 1)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    @property
    def training_width(self) -> int:
        """Hidden neurons trained."""
        return self.hidden

    @property
    def neurons_per_inference(self) -> int:
        """Hidden neurons evaluated per row at inference."""
        return self.hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fc1.weight
        check_input(self, x, self.in_features, weight if isinstance(weight, torch.Tensor) else _FLOAT32_CPU)
        return self.fc2(get_activation(self.activation)(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
