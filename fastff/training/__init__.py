"""Training support: auxiliary losses and the localised optimisers."""
from .losses import hardening_loss, load_balancing_loss, node_balance_loss
from .optim import LocalAdam, LocalSGD

__all__ = ["hardening_loss", "load_balancing_loss", "node_balance_loss", "LocalSGD", "LocalAdam"]
