"""The layers: FFF, NeuronTree, and the DenseFF / MoE baselines."""
from .dense import DenseFF
from .fff import FFF
from .moe import MoE
from .neuron_tree import NeuronTree
from .factory import FFN_KINDS, make_ffn

__all__ = ["FFF", "NeuronTree", "MoE", "DenseFF", "FFN_KINDS", "make_ffn"]
