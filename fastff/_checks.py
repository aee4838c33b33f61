"""Argument and input validation shared by the public API. Every failure names the argument.

Error contract of the layers (FFF, NeuronTree, MoE, DenseFF) and losses:

- a bad constructor / function argument (wrong value *or* wrong type, e.g. ``depth=2.5``) raises
  ``ValueError`` naming the argument and its allowed range or choices;
- an input that is not a tensor, or has a non-floating dtype or another dtype than the layer's
  parameters, raises ``TypeError``;
- an input of the wrong shape, or on another device than the layer, raises ``ValueError``;
- NaN / inf inputs propagate like in ``nn.Linear`` (a NaN row gives a NaN output row and leaves
  the other rows untouched). With ``check_finite`` on (``layer.check_finite = True`` for one
  layer, ``fastff.set_check_finite(True)`` for all layers without their own setting) a
  non-finite input raises ``ValueError`` instead. The check needs data, so it is skipped for
  inputs on the ``meta`` device and inside ``torch.compile`` / ``torch.export`` tracing.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

_check_finite = False


def set_check_finite(enabled: bool) -> None:
    """Default of ``check_finite`` for every layer whose own ``check_finite`` is ``None``
    (the default): when on, a NaN / inf input raises ``ValueError`` instead of propagating."""
    global _check_finite
    _check_finite = check_bool("enabled", enabled)


def get_check_finite() -> bool:
    """The global ``check_finite`` default."""
    return _check_finite


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` must be an integer (Python or NumPy, not bool) in [low, high]; returns it as int."""
    span = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {span}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """``value`` must be True or False (not merely truthy); returns it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_fraction(name: str, value, high: float = 1.0) -> float:
    """``value`` must be a finite number in [0, high]; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, {high}], got {value!r}")
    if not 0.0 <= value <= high:
        raise ValueError(f"{name} must be in [0, {high}], got {value}")
    return float(value)


def check_choice(name: str, value, choices):
    """``value`` must be one of ``choices``; returns it."""
    if not any(value is c or (isinstance(value, type(c)) and value == c) for c in choices):
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def check_parameter_bytes(layer: str, elements: int) -> None:
    """A layer of ``elements`` parameters (default dtype, default device) must fit in this
    machine's memory; otherwise ValueError naming the size in bytes (instead of an allocator
    failure, or a machine that starts swapping). Skipped on the ``meta`` device."""
    if torch.empty(0).device.type == "meta":
        return
    size = elements * torch.empty(0).element_size()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # not a POSIX system: no limit known
        return
    if size > memory:
        raise ValueError(f"{layer} would have {elements:,} parameters = {size:,} bytes ({size / 2**30:.1f} GiB), "
                         f"more than this machine's memory ({memory:,} bytes); use a smaller depth or width")


class CheckedInput:
    """Mixin of every fastff layer: the ``check_finite`` flag read by ``check_input``.

    ``None`` (default) follows ``set_check_finite``; ``True`` makes a NaN / inf input raise
    ``ValueError``; ``False`` lets it propagate. Setting it on a layer sets it on the fastff
    layers inside it too (e.g. FFF's master leaf)."""

    @property
    def check_finite(self) -> bool | None:
        return self.__dict__.get("_check_finite")

    @check_finite.setter
    def check_finite(self, value: bool | None) -> None:
        if value is not None:
            check_bool("check_finite", value)
        for m in self.modules():
            if isinstance(m, CheckedInput):
                m.__dict__["_check_finite"] = value


def finite_check_on(layer: CheckedInput) -> bool:
    """Whether ``layer``'s inputs must be finite: its ``check_finite``, or the global default."""
    flag = layer.__dict__.get("_check_finite")
    return _check_finite if flag is None else flag


def check_input(layer: CheckedInput, x: torch.Tensor, in_features: int, param: torch.Tensor) -> None:
    """The input of a layer must be a floating tensor of shape (..., in_features) in the dtype and
    on the device of the layer's parameter ``param``; with ``check_finite`` on (see the module
    docstring) it must also be finite. (Runs on every call: the common case costs a few
    attribute reads.)"""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(layer).__name__} expects a torch.Tensor of shape (..., {in_features}), "
                        f"got {type(x).__name__}")
    shape = x.shape
    if not shape or shape[-1] != in_features:
        raise ValueError(f"{type(layer).__name__} expects input of shape (..., {in_features}), got {tuple(shape)}")
    if x.dtype is not param.dtype:
        if not x.is_floating_point():
            raise TypeError(f"{type(layer).__name__} expects a floating-point input, got dtype {x.dtype}")
        raise TypeError(f"{type(layer).__name__} has parameters of dtype {param.dtype} but got input of dtype "
                        f"{x.dtype}; convert one of them (e.g. layer.to({param.dtype}) or x.to({param.dtype}))")
    if not (x.is_cpu and param.is_cpu) and x.device != param.device:
        raise ValueError(f"{type(layer).__name__} has parameters on device '{param.device}' but got input on "
                         f"device '{x.device}'; move one of them (e.g. x.to('{param.device}'))")
    if finite_check_on(layer) and not x.is_meta and not torch.compiler.is_compiling():
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise ValueError(f"{type(layer).__name__} got {bad} non-finite (NaN or inf) input value(s) in an "
                             f"input of shape {tuple(shape)} (check_finite is on)")


class ShapeCheckedLoad:
    """Mixin: loading a state_dict whose tensors have other shapes raises a ValueError that names
    the tensor, both shapes and this layer's configuration (instead of a bare size mismatch)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = dict(self.named_parameters(recurse=False)) | dict(self.named_buffers(recurse=False))
        diffs = [f"'{prefix}{k}': checkpoint {tuple(state_dict[prefix + k].shape)} vs layer {tuple(v.shape)}"
                 for k, v in own.items()
                 if v is not None and prefix + k in state_dict and state_dict[prefix + k].shape != v.shape]
        if diffs:
            raise ValueError(f"cannot load into {self!r}: the checkpoint was written for a layer of another "
                             f"shape; differing tensors: " + "; ".join(diffs))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
