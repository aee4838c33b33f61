"""`fastff train-bench`: forward + backward + optimizer step of one layer, dense vs conditional.

``train_step_rows`` times, in one process and interleaved (``timing.median_times``: one step of
every layer per round, after two warm-up rounds), a step of
``loss = mse(layer(x), target); loss.backward(); opt.step(); opt.zero_grad()`` (optimizer
``"adam"`` — fused Adam —, ``"sgd"`` or ``"local_adam"``; the same for every layer) for:

- ``DenseFF`` of width 4096 and 4095 (``backend="train-dense"``);
- ``NeuronTree`` 1x11 (4095 neurons, 12 per row; ``"train-conditional"``), vs DenseFF 4095;
- ``FFF`` depth 8 leaf 16 (width 4096) soft (``"train-soft"``) and hard_path
  (``"train-hard_path"``), vs DenseFF 4096.

``fastff train-bench [--dim 768 --batch 4096 --rounds 7 --optimizer adam]``; ``--optimizers``
times only the optimiser step (``optimizer_step_rows``).
"""
from __future__ import annotations

import torch

from .._checks import check_choice, check_int
from ..layers import FFF, DenseFF, NeuronTree
from ..threads import set_threads
from ..training.optim import LocalAdam, LocalSGD
from .timing import median_times

OPTIMIZERS = ("adam", "sgd", "local_adam")


def _configs(dim: int, usage: str | None):
    """(name, depth, backend, factory, dense width to compare with)."""
    return [
        ("DenseFF w4096", 0, "train-dense", lambda: DenseFF(dim, dim, 4096), 4096),
        ("DenseFF w4095", 0, "train-dense", lambda: DenseFF(dim, dim, 4095), 4095),
        ("NeuronTree 1x11", 11, "train-conditional", lambda: NeuronTree(dim, dim, 11, 1, usage=usage), 4095),
        ("FFF d8 l16", 8, "train-soft", lambda: FFF(dim, dim, 8, 16, activation="gelu", usage=usage), 4096),
        ("FFF d8 l16", 8, "train-hard_path",
         lambda: FFF(dim, dim, 8, 16, activation="gelu", train_mode="hard_path", usage=usage), 4096),
    ]


def _make_optimizer(name: str, layer):
    """Adam uses the fused single-pass CPU kernel; ``local_adam``: LocalAdam with local batch
    size 64 for routed layers (Adam for DenseFF)."""
    if name == "sgd":
        return torch.optim.SGD(layer.parameters(), lr=1e-3)
    if name == "local_adam" and not isinstance(layer, DenseFF):
        return LocalAdam(layer, lr=1e-4, local_batch_size=64)
    return torch.optim.Adam(layer.parameters(), lr=1e-4, fused=True)


def train_step_rows(dim: int = 768, batch: int = 4096, quick: bool = False, rounds: int | None = None,
                    optimizer: str = "adam", seed: int = 0) -> list[dict]:
    """Median fwd+bwd+optimizer-step time per layer (see module doc). ``quick``: a tiny smoke
    run (dim <= 32, batch <= 64, 1 round). -> rows {layer, batch, depth, backend, ms,
    speedup_vs_dense} (speedup vs the DenseFF of equal training width, measured in the same run)."""
    dim, batch = check_int("dim", dim, 1), check_int("batch", batch, 1)
    optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
    if quick:
        dim, batch, rounds = min(dim, 32), min(batch, 64), 1
    rounds = check_int("rounds", 7 if rounds is None else rounds, 1)
    torch.manual_seed(seed)
    x, target = torch.randn(batch, dim), torch.randn(batch, dim)
    runs = []
    usage = "hard" if optimizer == "local_adam" else None
    for name, depth, backend, make, width in _configs(dim, usage):
        layer = make().train()
        runs.append((name, depth, backend, width, layer, _make_optimizer(optimizer, layer)))

    def step(layer, opt) -> None:
        loss = torch.nn.functional.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()

    # two warm-up rounds (numba compile, allocator)
    times = median_times({i: (lambda r=r: step(r[4], r[5])) for i, r in enumerate(runs)}, rounds, warmup=2)
    ms = [1e3 * times[i] for i in range(len(runs))]
    dense = {width: m for (name, _, backend, width, *_), m in zip(runs, ms) if backend == "train-dense"}
    return [{"layer": name, "batch": batch, "depth": depth, "backend": backend, "ms": round(m, 2),
             "speedup_vs_dense": round(dense[width] / m, 2)}
            for (name, depth, backend, width, *_), m in zip(runs, ms)]


def optimizer_step_rows(dim: int = 768, batch: int = 4096, rounds: int = 5, seed: int = 0) -> list[dict]:
    """Median wall time of ``opt.step(); opt.zero_grad()`` on the gradients of one ``batch``-row
    backward of a NeuronTree 1x11 (``dim`` in and out), interleaved over optimisers.
    -> rows {optimizer, ms, touched_rows, neurons}."""
    torch.manual_seed(seed)
    x, target = torch.randn(batch, dim), torch.randn(batch, dim)
    makers = {
        "SGD": (None, lambda m: torch.optim.SGD(m.parameters(), lr=1e-3)),
        "Adam (fused)": (None, lambda m: torch.optim.Adam(m.parameters(), lr=1e-4, fused=True)),
        "Adam (foreach)": (None, lambda m: torch.optim.Adam(m.parameters(), lr=1e-4, foreach=True)),
        "LocalSGD lbs=64": ("hard", lambda m: LocalSGD(m, lr=1e-3, local_batch_size=64)),
        "LocalAdam lbs=64": ("hard", lambda m: LocalAdam(m, lr=1e-4, local_batch_size=64)),
        "LocalAdam lbs=1024": ("hard", lambda m: LocalAdam(m, lr=1e-4, local_batch_size=1024)),
    }
    layers, opts = {}, {}
    for name, (usage, make) in makers.items():
        layers[name] = NeuronTree(dim, dim, 11, 1, usage=usage).train()
        opts[name] = make(layers[name])
    touched = {}

    def backward(name: str) -> None:
        layer = layers[name]
        torch.nn.functional.mse_loss(layer(x), target).backward()
        touched[name] = int((layer.w_in.grad[0].abs().sum(1) > 0).sum())

    def step(name: str) -> None:
        opts[name].step()
        opts[name].zero_grad()

    times = median_times({n: (lambda n=n: step(n)) for n in makers}, rounds, warmup=2,
                         setup={n: (lambda n=n: backward(n)) for n in makers})
    return [{"optimizer": name, "ms": round(1e3 * times[name], 2), "touched_rows": touched[name],
             "neurons": layers[name].training_width} for name in makers]


def add_arguments(p) -> None:
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: torch's)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--optimizers", action="store_true",
                   help="time only the optimiser step on NeuronTree 1x11 gradients")


def run(args) -> int:
    if args.threads:
        set_threads(args.threads)
    if args.optimizers:
        for row in optimizer_step_rows(args.dim, args.batch):
            print(f"{row['optimizer']:20} {row['ms']:9.2f} ms   (rows touched by the batch: "
                  f"{row['touched_rows']} of {row['neurons']})")
        return 0
    rows = train_step_rows(args.dim, args.batch, args.quick, args.rounds, args.optimizer)
    print(f"{'layer':18} {'backend':18} {'batch':>6} {'ms':>10} {'vs dense':>9}")
    for row in rows:
        print(f"{row['layer']:18} {row['backend']:18} {row['batch']:>6} {row['ms']:>10.2f} {row['speedup_vs_dense']:>8.2f}x")
    return 0
