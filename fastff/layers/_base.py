"""What all routed layers share: leading-dims handling, input checks, the auxiliary-loss record
and the recorded constructor arguments that ``fastff.save`` / ``fastff.load`` rebuild from."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import ShapeCheckedLoad, check_bool, check_input
from ..io import serializable


class RoutedLayer(ShapeCheckedLoad, nn.Module):
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

    @property
    def check_finite(self) -> bool | None:
        return self.__dict__.get("_check_finite")

    @check_finite.setter
    def check_finite(self, value: bool | None) -> None:
        """Set for this layer and the fastff layers inside it (e.g. FFF's master leaf)."""
        if value is not None:
            check_bool("check_finite", value)
        for m in self.modules():
            if isinstance(m, RoutedLayer):
                m.__dict__["_check_finite"] = value
            elif type(m).__module__.startswith("fastff."):     # e.g. DenseFF, read by check_input
                m.check_finite = value

    def __getstate__(self):
        """Copies and pickles start with ``aux = {}``: it is per-forward state whose tensors
        belong to the autograd graph (``copy.deepcopy`` cannot copy non-leaf tensors)."""
        return dict(super().__getstate__(), aux={})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.in_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self._forward_meta(x2) if x.is_meta else self._forward_2d(x2)
        return y.reshape(*lead, self.out_features)

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
