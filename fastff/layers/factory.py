"""Build a feedforward layer by name: the one vocabulary shared by ``fastff train``, the GPT model
and every experiment (``dense``, ``fff``, ``neuron-tree``, ``moe``)."""
from __future__ import annotations

from torch import nn

from .._checks import check_choice, check_int
from .dense import DenseFF
from .fff import FFF
from .moe import MoE
from .neuron_tree import NeuronTree

FFN_KINDS = ("dense", "fff", "neuron-tree", "moe")


def make_ffn(kind: str, in_features: int, out_features: int, width: int, *, leaf: int = 8, trees: int = 1,
             depth: int | None = None, top_k: int = 1, activation: str = "gelu", **options) -> nn.Module:
    """A feedforward layer ``(..., in_features) -> (..., out_features)`` of training width ``width``.

    - ``dense``: ``DenseFF`` with ``width`` hidden neurons;
    - ``fff``: ``FFF`` with leaves of ``leaf`` neurons and depth ``log2(width / leaf)`` (``width``
      must be ``leaf`` times a power of two);
    - ``moe``: ``MoE`` with ``width / leaf`` experts of ``leaf`` neurons, top-``top_k`` routing;
    - ``neuron-tree``: ``NeuronTree`` with ``trees`` trees of depth ``depth``, or (``depth=None``)
      of the largest depth D with ``trees * (2**(D+1) - 1) <= width``.

    ``options`` go to the layer's constructor (e.g. ``train_mode``, ``master_leaf``, ``region_leak``,
    ``usage`` for FFF; ``usage`` for NeuronTree).
    """
    kind = check_choice("kind", kind, FFN_KINDS)
    width = check_int("width", width, 1)
    if kind == "dense":
        return DenseFF(in_features, out_features, width, activation, **options)
    if kind in ("fff", "moe"):
        leaf = check_int("leaf", leaf, 1)
        ratio = width // leaf
        if width % leaf or ratio & (ratio - 1):
            raise ValueError(f"width must be leaf * a power of two for {kind!r}; got width={width}, leaf={leaf}")
        if kind == "moe":
            return MoE(in_features, out_features, ratio, leaf, top_k, activation, **options)
        return FFF(in_features, out_features, ratio.bit_length() - 1, leaf, activation, **options)
    trees = check_int("trees", trees, 1)
    if depth is None:
        if width < trees:
            raise ValueError(f"neuron-tree width must be >= trees, got width={width}, trees={trees}")
        depth = (width // trees + 1).bit_length() - 2
    return NeuronTree(in_features, out_features, depth, trees, activation, **options)
