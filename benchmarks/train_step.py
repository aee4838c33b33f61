"""Training step (forward + backward of ``y.square().mean()``) of fastff layers, interleaved.

    .venv/bin/python benchmarks/train_step.py product-key   [--threads 1] [--rows 2048] [--torch-path]
    .venv/bin/python benchmarks/train_step.py tree-remedies [--threads 1] [--rows 2048] [--torch-path]

in = out = 128, float32, CPU, training mode. ``product-key``: ProductKeyFF(n_keys 16, heads 1,
top_k 16, key_dim 16) and (n_keys 22, heads 4, top_k 8, key_dim 32) on the CPU training path
(numba selection, gathered-row ops) against DenseFF hidden 48 and 512. ``tree-remedies``:
NeuronTree(depth 9, trees 2) plain (fused numba tree kernels), with ``route_bias=1e-3``,
``gate="path"`` and both (the ``"cpu"`` path of the options: grouped walk, gathered-row ops).
``--torch-path`` adds the same layers on the vectorised torch path (what other devices run).
Wall-clock medians, interleaved (``fastff.apps.timing.median_times``), so background load hits
every candidate alike: the ratios to the set's baseline are the numbers to compare.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from fastff import DenseFF, NeuronTree, ProductKeyFF
from fastff.apps.timing import median_times
from fastff.kernels import product_key as PK
from fastff.threads import set_threads

IN = OUT = 128
PK_CONFIGS = {"pk n16 h1 k16 d16": dict(n_keys=16, heads=1, top_k=16, key_dim=16),
              "pk n22 h4 k8 d32": dict(n_keys=22, heads=4, top_k=8, key_dim=32)}
DEPTH, TREES = 9, 2
TREE_CONFIGS = {"plain": {}, "route_bias 1e-3": dict(route_bias=1e-3), "gate path": dict(gate="path"),
                "route_bias + gate": dict(route_bias=1e-3, gate="path")}


class TorchPath(nn.Module):
    """A ProductKeyFF's training forward on the vectorised torch path."""

    def __init__(self, layer: ProductKeyFF):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        return PK.product_key(x, *m._weights(), m.top_k, m.activation, m.query_norm, m._running(), update=True)[0]


def product_key_set(torch_path: bool) -> tuple[dict, str]:
    modules = {name: ProductKeyFF(IN, OUT, **cfg).train() for name, cfg in PK_CONFIGS.items()}
    if torch_path:
        modules.update({f"{name} (torch path)": TorchPath(modules[name]) for name in PK_CONFIGS})
    modules.update({"dense 48": DenseFF(IN, OUT, 48).train(), "dense 512": DenseFF(IN, OUT, 512).train()})
    return modules, "dense 512"


def tree_remedies_set(torch_path: bool) -> tuple[dict, str]:
    modules = {name: NeuronTree(IN, OUT, DEPTH, TREES, **cfg).train() for name, cfg in TREE_CONFIGS.items()}
    if torch_path:
        modules.update({f"{name} (torch)": NeuronTree(IN, OUT, DEPTH, TREES, backend="torch", **cfg).train()
                        for name, cfg in TREE_CONFIGS.items() if cfg})
    return modules, "plain"


SETS = {"product-key": product_key_set, "tree-remedies": tree_remedies_set}


def step(module: nn.Module, x: torch.Tensor):
    def run():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("set", choices=sorted(SETS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--torch-path", action="store_true", help="also time the layers on the vectorised torch path")
    args = p.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.rows, IN)
    modules, baseline = SETS[args.set](args.torch_path)
    times = median_times({name: step(m, x) for name, m in modules.items()}, args.repeats)
    print(f"{args.set}: train step (forward + backward), {args.rows} rows, in = out = {IN}, float32, "
          f"{args.threads} thread(s); wall-clock medians of {args.repeats}, interleaved")
    print(f"{'':34s} {'ms':>8s} {'/ ' + baseline:>12s}")
    for name, t in times.items():
        print(f"{name:34s} {t * 1e3:8.2f} {t / times[baseline]:12.2f}")


if __name__ == "__main__":
    main()
