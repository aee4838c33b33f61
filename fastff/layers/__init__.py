"""The layers: FFF, NeuronTree, and the DenseFF / MoE baselines; ``families`` registers every
feedforward kind by name (``make_ffn`` builds one)."""
from .dense import DenseFF
from .fff import FFF
from .moe import MoE
from .neuron_tree import NeuronTree
from .families import FAMILIES, Family, Option, family, family_of, feedforwards, make_ffn, register

__all__ = ["FFF", "NeuronTree", "MoE", "DenseFF", "FAMILIES", "Family", "Option", "family", "family_of",
           "feedforwards", "make_ffn", "register"]
