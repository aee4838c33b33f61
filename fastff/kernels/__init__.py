"""Inference backends and the dispatch between them.

Backends implement ``fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation)`` and
``neuron_tree(x, w_in, b_in, w_out, b_out, activation)`` on 2-D inputs:

- ``"reference"``: per-row Python walk (slow, obviously correct; tests and baselines);
- ``"torch"``: vectorised gathers, any device, differentiable;
- ``"auto"`` (default): the fastest backend available for the tensor at hand.
"""
from __future__ import annotations

from types import ModuleType

from .._checks import check_choice
from . import reference, vectorized

BACKENDS: dict[str, ModuleType] = {"reference": reference, "torch": vectorized}
_default = "auto"


def set_backend(name: str) -> None:
    """Choose the default inference backend for every layer: ``"auto"`` or a name in ``BACKENDS``."""
    global _default
    _default = check_choice("backend", name, ("auto", *BACKENDS))


def get_backend() -> str:
    """The current default backend name."""
    return _default


def resolve(backend: str | None, x) -> ModuleType:
    """The backend module that runs ``x``: ``backend`` if given, else the global default."""
    name = check_choice("backend", backend or _default, ("auto", *BACKENDS))
    if name == "auto":
        name = "torch"
    return BACKENDS[name]
