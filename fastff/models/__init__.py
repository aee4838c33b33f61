"""Real models: swap feedforward blocks for fast layers (``replace_ffn``), carve FFFs out of
trained dense FFNs (``carve``, ``distill``), convert whole models block by block
(``convert_blocks``) and distil them end to end (``distill_model``)."""
from .convert import Carved, carve, distill, neuron_importance, route_leaves
from .integrate import (DenseWeights, Replacement, dense_weights, ffn_input_module, find_ffn, identify_activation,
                        replace_ffn, swap_ffn)
from .sequential import BlockFit, convert_blocks, distill_model, ffn_inputs, mean_pool

__all__ = ["replace_ffn", "swap_ffn", "find_ffn", "ffn_input_module", "dense_weights", "identify_activation",
           "DenseWeights", "Replacement", "carve", "distill", "Carved", "route_leaves",
           "neuron_importance", "BlockFit", "convert_blocks", "distill_model", "ffn_inputs", "mean_pool"]
