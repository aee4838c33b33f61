"""fastff: fast feedforward networks for PyTorch.

Layers: ``FFF`` (Belcak & Wattenhofer), ``NeuronTree`` (UltraFastBERT), and the ``DenseFF`` /
``MoE`` baselines. Auxiliary losses: ``hardening_loss``, ``load_balancing_loss``.
Inference backend choice: ``set_backend``.
"""
from .kernels import get_backend, set_backend
from .layers import FFF, DenseFF, MoE, NeuronTree
from .training.losses import hardening_loss, load_balancing_loss

__version__ = "0.1.0"
__all__ = ["FFF", "NeuronTree", "MoE", "DenseFF", "hardening_loss", "load_balancing_loss",
           "set_backend", "get_backend"]
