"""`fastff demo` (= `make demo`): Dense vs FFF vs NeuronTree (vs MoE) on scikit-learn's digits.

Every model maps the 64 pixels straight to the 10 classes with the same training width (128
neurons, 127 for the neuron tree), is trained with Adam on 70% of the data, selected on a 10%
validation split and tested once on the remaining 20%. Then all layers are timed in eval mode
in the same process, and the same comparison is repeated at transformer scale (dim 768,
training width 4095/4096), where conditional inference pays off.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import fastff
from ..progress import progress
from .timing import median_times


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=60, help="training epochs per model (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests (3 epochs, small timings)")


def digits_splits(seed: int):
    """(x, y) tensors for train / val / test = 70 / 10 / 20 % of sklearn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.7 * len(y)), int(0.1 * len(y))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return [(x[i], y[i]) for i in parts]


def models(d_in: int, d_out: int) -> dict[str, nn.Module]:
    """The compared layers, all with training width 128 (the neuron tree: 127)."""
    return {
        "DenseFF w=128": fastff.DenseFF(d_in, d_out, 128),
        "FFF d=4 l=8": fastff.FFF(d_in, d_out, depth=4, leaf_width=8),
        "NeuronTree 1x6": fastff.NeuronTree(d_in, d_out, depth=6),
        "MoE 8x16 top-1": fastff.MoE(d_in, d_out, experts=8, expert_width=16, k=1),
    }


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def train(model: nn.Module, splits, epochs: int, seed: int, bar) -> nn.Module:
    """Adam + cross-entropy (+ hardening and load balancing for FFF); returns the best-on-validation copy."""
    (x, y), (xv, yv), _ = splits
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    best, best_acc = copy.deepcopy(model), -1.0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if isinstance(model, fastff.FFF):
                loss = loss + 1.0 * fastff.hardening_loss(model) + fastff.load_balancing_loss(model, 0.01)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = accuracy(model, xv, yv)
        if val > best_acc:
            best, best_acc = copy.deepcopy(model), val
        bar.set_postfix(val=f"{val:.3f}", refresh=False)
        bar.update()
    return best


@torch.inference_mode()
def time_eval(layers: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median eval time (ms) per batch of every layer, measured interleaved in one process."""
    for layer in layers.values():
        layer.eval()
    times = median_times({name: (lambda m=m: m(x)) for name, m in layers.items()}, repeats, warmup=1)
    return {name: 1e3 * t for name, t in times.items()}


def run(args) -> int:
    torch.manual_seed(args.seed)
    epochs = 3 if args.quick else args.epochs
    splits = digits_splits(args.seed)
    trained = {}
    bar = progress(total=epochs * 4, desc="training on digits", unit="epoch")
    for name, model in models(64, 10).items():
        bar.set_description(f"training {name}", refresh=False)
        trained[name] = train(model, splits, epochs, args.seed, bar)
    bar.close()

    (x, y), _, (xt, yt) = splits
    repeats = 5 if args.quick else 50
    t1 = time_eval(trained, xt[:1], repeats)
    tb = time_eval(trained, xt, repeats)
    dense = next(iter(trained))
    print(f"\nDigits (1797 samples, 64 -> 10), {epochs} epochs, backend={fastff.get_backend()}, "
          f"threads={torch.get_num_threads()}; selected on validation, test touched once")
    print(f"{'model':<16} {'train acc':>9} {'test acc':>8} {'neurons/inference':>18} {'width':>6} "
          f"{'eval b=1 vs dense':>18} {f'eval b={len(yt)} vs dense':>20}")
    for name, m in trained.items():
        print(f"{name:<16} {accuracy(m, x, y):>9.3f} {accuracy(m, xt, yt):>8.3f} {m.neurons_per_inference:>18} "
              f"{m.training_width:>6} {t1[dense] / t1[name]:>17.2f}x {tb[dense] / tb[name]:>19.2f}x")

    dim, batch, width, depth_fff, depth_nt = (32, 64, 64, 2, 5) if args.quick else (768, 4096, 4096, 8, 11)
    big = {f"DenseFF w={width}": fastff.DenseFF(dim, dim, width),
           f"FFF d={depth_fff} l=16": fastff.FFF(dim, dim, depth=depth_fff, leaf_width=16),
           f"NeuronTree 1x{depth_nt}": fastff.NeuronTree(dim, dim, depth=depth_nt)}
    for b in (1, batch):
        tb = time_eval(big, torch.randn(b, dim), 5 if args.quick else 20)
        ref = tb[f"DenseFF w={width}"]
        print(f"\nAt scale: dim {dim}, batch {b} (untrained weights; eval time only)")
        for name, ms in tb.items():
            print(f"  {name:<16} {ms:9.3f} ms   {ref / ms:8.1f}x vs dense   "
                  f"{big[name].neurons_per_inference} of {big[name].training_width} neurons")
    return 0
