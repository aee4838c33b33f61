"""A small ViT whose feedforward blocks are any fastff layer (the FFF paper's Table 3 analogue)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .._checks import check_int

FFNFactory = Callable[[int, int], nn.Module]   # (in_features, out_features) -> feedforward layer


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + FFN(LN(x)). x (B, T, dim)."""

    def __init__(self, dim: int, heads: int, ffn: FFNFactory):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = ffn(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


class TinyViT(nn.Module):
    """x (B, H*W) flattened single-channel images -> logits (B, n_classes).

    Non-overlapping ``patch`` x ``patch`` patches are embedded linearly to ``dim``, a class
    token and learned positions are added, ``layers`` blocks follow, and the class token's
    final LayerNorm feeds a linear head. The FFN of every block is ``ffn(dim, dim)``.
    """

    def __init__(self, image_shape, n_classes: int, ffn: FFNFactory, patch: int = 7, dim: int = 64,
                 layers: int = 2, heads: int = 4):
        super().__init__()
        if not image_shape or len(image_shape) != 2:
            raise ValueError(f"TinyViT needs 2-D images, got image_shape {image_shape}")
        h, w = image_shape
        patch = check_int("patch", patch, 1)
        if h % patch or w % patch:
            raise ValueError(f"patch must divide the image size {h}x{w}, got {patch}")
        self.shape, self.patch = (h, w), patch
        tokens = (h // patch) * (w // patch)
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, ffn) for _ in range(check_int("layers", layers, 1)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W) -> (B, tokens, patch*patch)."""
        p, (h, w) = self.patch, self.shape
        x = x.reshape(-1, h // p, p, w // p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(x.shape[0], -1, p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(self.patches(x))
        t = torch.cat((self.cls.expand(len(t), -1, -1), t), dim=1) + self.pos
        for block in self.blocks:
            t = block(t)
        return self.head(self.norm(t[:, 0]))
