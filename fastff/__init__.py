"""fastff: fast feedforward networks for PyTorch.

Layers: ``FFF`` (Belcak & Wattenhofer), ``NeuronTree`` (UltraFastBERT), ``ProductKeyFF`` (PEER),
and the ``DenseFF`` / ``MoE`` baselines. Auxiliary losses: ``hardening_loss``, ``load_balancing_loss``,
``node_balance_loss``.
Inference backend choice: ``set_backend``. Saving: ``save`` / ``load``. Reliability:
``set_check_finite``, ``set_deterministic``.
"""
from .kernels import get_backend, set_backend
from .layers import FFF, DenseFF, MoE, NeuronTree, ProductKeyFF
from .training.losses import hardening_loss, load_balancing_loss, node_balance_loss
from ._checks import set_check_finite
from .io import load, save
from .determinism import set_deterministic
from .models import carve, distill, replace_ffn

__version__ = "0.1.0"
__all__ = ["FFF", "NeuronTree", "MoE", "DenseFF", "ProductKeyFF", "hardening_loss", "load_balancing_loss",
           "node_balance_loss",
           "set_backend", "get_backend", "set_check_finite", "save", "load", "set_deterministic",
           "replace_ffn", "carve", "distill"]
