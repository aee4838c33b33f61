"""Argument and input validation shared by the public API. Every failure names the argument."""
from __future__ import annotations

import math

import torch


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` must be an int in [low, high]; returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {span}, got {value}")
    return value


def check_fraction(name: str, value, high: float = 1.0) -> float:
    """``value`` must be a finite number in [0, high]; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, {high}], got {value!r}")
    if not 0.0 <= value <= high:
        raise ValueError(f"{name} must be in [0, {high}], got {value}")
    return float(value)


def check_choice(name: str, value, choices):
    """``value`` must be one of ``choices``; returns it."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def check_input(layer: torch.nn.Module, x: torch.Tensor, in_features: int) -> None:
    """The input of a layer must be a floating tensor of shape (..., in_features) in the layer's dtype."""
    name = type(layer).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor of shape (..., {in_features}), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{name} expects input of shape (..., {in_features}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}")
    dtype = next(layer.parameters()).dtype
    if x.dtype != dtype:
        raise TypeError(f"{name} has parameters of dtype {dtype} but got input of dtype {x.dtype}; "
                        f"convert one of them (e.g. layer.to({dtype}) or x.to({dtype}))")


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
