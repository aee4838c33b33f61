"""Reproducible runs: ``set_deterministic(True, seed=...)``."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ._checks import check_int


def set_deterministic(enabled: bool = True, seed: int | None = None) -> None:
    """Make training reproducible (``enabled=True``) or restore PyTorch's defaults (``False``).

    On: ``torch.use_deterministic_algorithms(True)`` (ops without a deterministic implementation
    then raise instead of silently varying), cuDNN deterministic and not benchmarking, and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (needed by deterministic cuBLAS).
    ``seed`` (int >= 0, optional) seeds Python's ``random``, NumPy and torch (all devices).
    Results are reproducible for the same seed, thread count, device and library versions;
    DataLoader workers also need a seeded ``generator``.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    if seed is not None:
        seed = check_int("seed", seed, 0, 2**32 - 1)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
