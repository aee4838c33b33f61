"""The layers: FFF, NeuronTree, ProductKeyFF, and the DenseFF / MoE baselines; ``families`` registers every
feedforward kind by name (``make_ffn`` builds one)."""
from .dense import DenseFF
from .fff import FFF
from .moe import MoE
from .neuron_tree import NeuronTree
from .product_key import ProductKeyFF
from .families import FAMILIES, Family, Option, family, family_of, feedforwards, make_ffn, register

__all__ = ["FFF", "NeuronTree", "MoE", "DenseFF", "ProductKeyFF", "FAMILIES", "Family", "Option", "family", "family_of",
           "feedforwards", "make_ffn", "register"]
