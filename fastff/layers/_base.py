"""What all routed layers share: leading-dims handling and the auxiliary-loss record."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import ShapeCheckedLoad, check_input


class RoutedLayer(ShapeCheckedLoad, nn.Module):
    """Base of FFF, NeuronTree and MoE.

    Subclasses implement ``_forward_2d(x (B, in_features)) -> (B, out_features)``; this class
    validates the input and restores leading batch dims, like ``nn.Linear``. After a training
    forward, ``self.aux`` holds only what the auxiliary losses need (small per-node / per-leaf
    vectors, see ``fastff.training.losses``); it is ``{}`` before the first training forward.
    """

    in_features: int
    out_features: int

    def __init__(self):
        super().__init__()
        self.aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.in_features)
        lead = x.shape[:-1]
        y = self._forward_2d(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
