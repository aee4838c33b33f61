"""What all routed layers share: leading-dims handling, input checks, the auxiliary-loss record
and the recorded constructor arguments that ``fastff.save`` / ``fastff.load`` rebuild from."""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .._checks import CheckedInput, ShapeCheckedLoad, check_input, finite_check_on
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
        if not torch.compiler.is_compiling():   # traced calls take the general path (custom ops)
            y = self._eager_forward(x)
            if y is not None:
                return y
        check_input(self, x, self.in_features, self._param(self._reference))
        if x.is_meta:
            return self._forward_meta(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if x.dim() == 2:
            return self._forward_2d(x)
        return self._forward_2d(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    _reference: str  # name of the parameter whose dtype and device inputs must have

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The eval forward of x on prepared weights, or None: the general path (see ``EagerKernel``)."""
        return None

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


class EagerKernel:
    """Mixin, before ``RoutedLayer``, of layers whose eval forward is one inference op (NeuronTree;
    FFF without master leaf): eval calls with no gradient, not traced, run the op's prepared
    fast path when the layer's backend (``kernels.resolve``) offers one (see ``fastff.kernels``):
    made once and kept in ``_eager`` with that backend, the ``kernels.stamp`` of the parameters
    and the ``_eager_config``, re-prepared when any of them changes."""

    _eager: tuple | None = None  # (backend, stamp of the parameters, eager config, prepared call or None)

    def __getstate__(self):
        """Copies and pickles re-prepare (the prepared call holds views of this layer's memory)."""
        return dict(super().__getstate__(), _eager=None)

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The eval forward of x (..., in) on the prepared fast path: the batch-1 hot path, a few
        checks that nothing changed since it was prepared. None when the general path must run
        this call: training, grad mode, check_finite on, a backend without a prepared path,
        weights or an input the path does not take as they are (the general path converts or
        rejects them)."""
        if self.training or torch.is_grad_enabled() or type(x) is not torch.Tensor or finite_check_on(self):
            return None
        backend, eager = kernels.resolve(self.backend), self._eager
        st, config = kernels.stamp(self._parameters.values()), self._eager_config()
        if eager is None or eager[0] is not backend or eager[1] != st or eager[2] != config:
            eager = self._eager = (backend, st, config, self._prepare_eager(backend))
        return None if eager[3] is None else eager[3](x)

    def _eager_config(self) -> tuple:  # pragma: no cover - abstract
        """The op's arguments after the weights: the activation, then its flags (e.g. gated)."""
        raise NotImplementedError

    def _prepare_eager(self, backend):  # pragma: no cover - abstract
        """This layer's eval forward as ``backend``'s prepared call (``_prepared``), or None if it
        is not one inference op (then every eval call takes the general path)."""
        raise NotImplementedError

    def _prepared(self, backend, op: str, names: tuple, buffers: tuple = ()):
        """``backend.prepare(op, weights, *_eager_config())`` for the parameters ``names`` followed
        by the ``buffers`` (None where absent), or None when the backend has no prepared path or a
        parameter is not registered here (e.g. parametrized)."""
        prepare = getattr(backend, "prepare", None)
        if prepare is None or not all(n in self._parameters for n in names):
            return None
        weights = (*(self._parameters[n] for n in names), *(self._buffers.get(n) for n in buffers))
        return prepare(op, weights, *self._eager_config())
