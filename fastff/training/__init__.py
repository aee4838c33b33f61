"""Training support: auxiliary losses (and, in later modules, optimisers and the trainer)."""
from .losses import hardening_loss, load_balancing_loss

__all__ = ["hardening_loss", "load_balancing_loss"]
