"""What all routed layers share: leading-dims handling, input checks, the auxiliary-loss record
and the recorded constructor arguments that ``fastff.save`` / ``fastff.load`` rebuild from."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import CheckedInput, ShapeCheckedLoad, check_input
from ..io import serializable


def batch_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over the rows (dim 0) of t (B, ...); zeros for an empty batch (not NaN)."""
    return t.sum(0) / max(1, t.shape[0])


class RoutedLayer(CheckedInput, ShapeCheckedLoad, nn.Module):
    """Base of FFF, NeuronTree and MoE.

    Subclasses implement ``_forward_2d(x (B, in_features)) -> (B, out_features)``; this class
    validates the input and restores leading batch dims, like ``nn.Linear``. After a training
    forward, ``self.aux`` holds only what the auxiliary losses need (small per-node / per-leaf
    vectors, see ``fastff.training.losses``); it is ``{}`` before the first training forward.

    ``check_finite``: ``None`` (default) follows ``fastff.set_check_finite``; ``True`` makes a
    NaN / inf input raise ``ValueError``; ``False`` lets it propagate like ``nn.Linear``.
    On the ``meta`` device the forward infers the output shape where the computation allows
    it; forwards that read data (routing statistics, per-row backends) raise ``ValueError``.
    Subclasses are registered with ``fastff.io.serializable`` (constructor arguments recorded).
    """

    in_features: int
    out_features: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        serializable(cls)

    def __init__(self):
        super().__init__()
        self.aux: dict[str, torch.Tensor] = {}

    def __getstate__(self):
        """Copies and pickles start with ``aux = {}``: it is per-forward state whose tensors
        belong to the autograd graph (``copy.deepcopy`` cannot copy non-leaf tensors)."""
        return dict(super().__getstate__(), aux={})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.in_features, self._param(self._reference))
        if x.is_meta:
            return self._forward_meta(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if x.dim() == 2:
            return self._forward_2d(x)
        return self._forward_2d(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    _reference: str  # name of the parameter whose dtype and device inputs must have

    def _param(self, name: str) -> torch.Tensor | None:
        """Parameter ``name``, read from ``_parameters`` when registered there: the eval hot path
        skips ``nn.Module.__getattr__`` (~0.5 µs per attribute); anything else (a parametrized
        weight, an absent bias) takes the normal attribute lookup."""
        p = self._parameters.get(name)
        return p if p is not None else getattr(self, name)

    def _forward_meta(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward_2d(x)
        except (NotImplementedError, RuntimeError) as e:   # meta tensors hold no data to read
            mode = "training" if self.training else "eval"
            raise ValueError(f"{type(self).__name__} cannot run in {mode} mode on the 'meta' device: this "
                             f"forward reads data (routing counts or a per-row walk); use a real device "
                             f"({type(e).__name__}: {e})") from e

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
