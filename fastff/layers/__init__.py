"""The layers: FFF, NeuronTree, and the DenseFF / MoE baselines."""
from .dense import DenseFF
from .fff import FFF
from .moe import MoE
from .neuron_tree import NeuronTree

__all__ = ["FFF", "NeuronTree", "MoE", "DenseFF"]
