"""Training support: auxiliary losses and the localised optimisers."""
from .losses import hardening_loss, load_balancing_loss
from .optim import LocalAdam, LocalSGD

__all__ = ["hardening_loss", "load_balancing_loss", "LocalSGD", "LocalAdam"]
