"""Training step (forward + backward of ``y.square().mean()``) of NeuronTree with its routing options.

    .venv/bin/python benchmarks/tree_remedies_step.py [--threads 1] [--rows 2048] [--torch-path]

NeuronTree(128, 128, depth 9, trees 2), float32, CPU, in training mode: plain (the fused numba
tree kernels), ``route_bias=1e-3``, ``gate="path"`` and both (the ``"cpu"`` path of the options:
grouped walk, gathered-row ops); ``--torch-path`` adds the option layers on ``backend="torch"``
(vectorised gathers, what other devices run). Wall-clock medians, interleaved
(``fastff.apps.timing.median_times``), so background load hits every candidate alike; the ratios
to the plain tree are the numbers to compare.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from fastff import NeuronTree
from fastff.apps.timing import median_times
from fastff.threads import set_threads

IN = OUT = 128
DEPTH, TREES = 9, 2
CONFIGS = {"plain": {}, "route_bias 1e-3": dict(route_bias=1e-3), "gate path": dict(gate="path"),
           "route_bias + gate": dict(route_bias=1e-3, gate="path")}


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
    p.add_argument("--torch-path", action="store_true", help="also time the option layers on backend 'torch'")
    args = p.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.rows, IN)
    modules = {name: NeuronTree(IN, OUT, DEPTH, TREES, **cfg).train() for name, cfg in CONFIGS.items()}
    if args.torch_path:
        modules.update({f"{name} (torch)": NeuronTree(IN, OUT, DEPTH, TREES, backend="torch", **cfg).train()
                        for name, cfg in CONFIGS.items() if cfg})
    times = median_times({name: step(m, x) for name, m in modules.items()}, args.repeats)
    print(f"NeuronTree({IN}, {OUT}, depth {DEPTH}, trees {TREES}) train step (forward + backward), {args.rows} rows, "
          f"float32, {args.threads} thread(s); wall-clock medians of {args.repeats}, interleaved")
    print(f"{'':28s} {'ms':>8s} {'/ plain':>8s}")
    for name, t in times.items():
        print(f"{name:28s} {t * 1e3:8.2f} {t / times['plain']:8.2f}")


if __name__ == "__main__":
    main()
