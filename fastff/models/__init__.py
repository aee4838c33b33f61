"""Real models: swap feedforward blocks for fast layers (``replace_ffn``) and carve FFFs out of
trained dense FFNs (``carve``, ``distill``)."""
from .convert import Carved, carve, distill, neuron_importance, route_leaves, routed_forward
from .integrate import DenseWeights, Replacement, dense_weights, find_ffn, identify_activation, replace_ffn

__all__ = ["replace_ffn", "find_ffn", "dense_weights", "identify_activation", "DenseWeights", "Replacement",
           "carve", "distill", "Carved", "route_leaves", "routed_forward", "neuron_importance"]
