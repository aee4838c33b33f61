"""Training step (forward + backward of ``y.square().mean()``) of ProductKeyFF against DenseFF.

    .venv/bin/python benchmarks/product_key_step.py [--threads 1] [--rows 2048] [--torch-path]

in = out = 128, float32, CPU. Candidates: ProductKeyFF(n_keys 16, heads 1, top_k 16, key_dim 16)
and ProductKeyFF(n_keys 22, heads 4, top_k 8, key_dim 32) in training mode (the CPU training
path: numba selection and expert kernels), DenseFF hidden 48 and 512; ``--torch-path`` adds
both product-key layers on the vectorised torch path (``fastff.kernels.product_key.product_key``,
what other devices run). Wall-clock medians, interleaved (``fastff.apps.timing.median_times``),
so background load hits every candidate alike; the ratios to DenseFF are the numbers to compare.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from fastff import DenseFF, ProductKeyFF
from fastff.apps.timing import median_times
from fastff.kernels import product_key as PK
from fastff.threads import set_threads

IN = OUT = 128
CONFIGS = {"pk n16 h1 k16 d16": dict(n_keys=16, heads=1, top_k=16, key_dim=16),
           "pk n22 h4 k8 d32": dict(n_keys=22, heads=4, top_k=8, key_dim=32)}


class TorchPath(nn.Module):
    """A ProductKeyFF's training forward on the vectorised torch path."""

    def __init__(self, layer: ProductKeyFF):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        return PK.product_key(x, *m._weights(), m.top_k, m.activation, m.query_norm, m._running(), update=True)[0]


def step(module: nn.Module, x: torch.Tensor):
    def run():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--torch-path", action="store_true", help="also time the product-key layers on the torch path")
    args = p.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.rows, IN)
    modules = {name: ProductKeyFF(IN, OUT, **cfg).train() for name, cfg in CONFIGS.items()}
    if args.torch_path:
        modules.update({f"{name} (torch path)": TorchPath(modules[name]) for name in CONFIGS})
    modules.update({"dense 48": DenseFF(IN, OUT, 48).train(), "dense 512": DenseFF(IN, OUT, 512).train()})
    times = median_times({name: step(m, x) for name, m in modules.items()}, args.repeats)
    print(f"train step (forward + backward), {args.rows} rows, in = out = {IN}, float32, "
          f"{args.threads} thread(s); wall-clock medians of {args.repeats}, interleaved")
    print(f"{'':34s} {'ms':>8s} {'/ dense 48':>11s} {'/ dense 512':>12s}")
    for name, t in times.items():
        print(f"{name:34s} {t * 1e3:8.2f} {t / times['dense 48']:11.2f} {t / times['dense 512']:12.2f}")


if __name__ == "__main__":
    main()
