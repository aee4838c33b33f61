"""A small ViT whose feedforward blocks are any fastff layer (FFF paper, Table 3 analogue), and
the FFN timing used by `fastff experiment vit`."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from ..data import Dataset
from ..training.trainer import TrainConfig, make_ffn
from ..kernels._threads import set_threads


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + FFN(LN(x)). x (B, T, dim)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.vit_dim)
        self.attn = nn.MultiheadAttention(cfg.vit_dim, cfg.vit_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.vit_dim)
        self.ffn = make_ffn(cfg, cfg.vit_dim, cfg.vit_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


class TinyViT(nn.Module):
    """x (B, H*W) flattened standardised single-channel images -> logits (B, classes).

    Non-overlapping ``patch`` x ``patch`` patches are embedded linearly to ``vit_dim``, a class
    token and learned positions are added, ``vit_layers`` blocks follow, and the class token's
    final LayerNorm feeds a linear head. The FFN of every block is ``make_ffn(cfg, dim, dim)``.
    """

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        if not cfg.image_shape or len(cfg.image_shape) != 2:
            raise ValueError(f"arch 'vit' needs 2-D images, the data has image_shape {cfg.image_shape}")
        h, w = cfg.image_shape
        if h % cfg.patch or w % cfg.patch:
            raise ValueError(f"patch must divide the image size {h}x{w}, got {cfg.patch}")
        self.shape, self.patch = (h, w), cfg.patch
        tokens = (h // cfg.patch) * (w // cfg.patch)
        self.embed = nn.Linear(cfg.patch * cfg.patch, cfg.vit_dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.vit_dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, cfg.vit_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.vit_layers))
        self.norm = nn.LayerNorm(cfg.vit_dim)
        self.head = nn.Linear(cfg.vit_dim, cfg.n_classes)

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


@torch.no_grad()
def ffn_seconds_per_token(model: TinyViT, x: torch.Tensor, repeats: int = 5) -> tuple[float, int]:
    """Eval-mode wall time of the first block's FFN alone, per token (best of ``repeats``), on the
    real FFN inputs that the images ``x`` (B, H*W) produce. Returns (seconds per token, tokens)."""
    model.eval()
    block = model.blocks[0]
    seen = []
    handle = block.ffn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    tokens = seen[0].reshape(-1, seen[0].shape[-1]).contiguous()
    threads = torch.get_num_threads()
    block.ffn(tokens)                                                  # warm-up (may compile kernels)
    set_threads(threads)                                     # a kernel's init may change it
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        block.ffn(tokens)
        best = min(best, time.perf_counter() - start)
    return best / len(tokens), len(tokens)


def save_ffn_timing(out: Path, model: TinyViT, data: Dataset, rows: int = 1000) -> None:
    """Write ``timing.json`` (FFN time per token) for a trained ViT run, timed on validation
    images so the test split stays untouched."""
    seconds, tokens = ffn_seconds_per_token(model, data.val.x[:rows])
    (Path(out) / "timing.json").write_text(json.dumps(
        {"ffn_seconds_per_token": seconds, "tokens": tokens, "threads": torch.get_num_threads(),
         "ffn_neurons_per_inference": model.blocks[0].ffn.neurons_per_inference}, indent=1))
