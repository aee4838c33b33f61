"""`fastff experiment table1|ablation|moe|vit|recipe`: run a whole grid of `fastff train` runs, then its
report. Runs go to ``<runs>/<experiment>/<name>_s<seed>/``; a run whose metrics.json exists is
skipped, so an interrupted grid resumes where it stopped. Each process uses one torch thread
(``--threads``) so several grids can share the machine.

Default sizes (chosen so every grid fits in <= 30 min on one core of a 2-core CPU; the full
sizes are the flags shown):

- table1:   FashionMNIST 10 epochs, MNIST-5k 40 epochs, w in {16,32,64,128}, leaf in {1,2,4,8},
            FF and FFF, 3 seeds   (paper-like: --epochs-fashion 100 --epochs-mnist 200 --seeds 10)
- ablation: FashionMNIST w=128 l=8, 10 epochs, 3 seeds, FFF / +balance / +master (scalar, token)
            / +balance+master / +region leak / +all / hard_path / +all+hard_path
- moe:      FashionMNIST w=128, 10 epochs, 3 seeds: FF, MoE (expert 16, k=1 and k=2), FFF l=16
            (FFF l=8 at the same width is the ablation's plain "fff" row)
- vit:      FashionMNIST 5k training rows, 3 epochs, 3 seeds, ViT patch 7, dim 64, 2 layers,
            SGD momentum 0.9 lr 0.05, GELU, hardening 0.5 (reach mode):
            FF (128) vs FFF l=1 d=7 vs FFF l=8 d=4     (bigger: --limit 0 --epochs 20)
- recipe:   FashionMNIST w=128, 50 epochs, 3 seeds (30 runs): FF, plain FFF l=8 (no master leaf)
            and its eFFF variants ``RECIPE_VARIANTS``, all with the improved recipe ``RECIPE`` (SGD
            lr 0.2 with cosine decay to 0, h=3 hardening ramped in linearly over the first 10
            epochs), plus FF with its own recipe ``FF_RECIPE`` (SGD momentum 0.9, lr 0.05, weight
            decay 5e-4, cosine decay). Both recipes were chosen on validation accuracy.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from ..data import BUILTIN, Dataset
from ..models.vit import TinyViT
from ..threads import set_threads
from ..training.trainer import TrainConfig
from .timing import median_times

EXPERIMENTS = ("table1", "ablation", "moe", "vit", "recipe")
# The `recipe` grid's training recipe (the other grids keep the FFF paper's: SGD 0.2 without
# schedule, h=3 from the first step) and the FFF l=8 variants it trains with it.
RECIPE = dict(schedule="cosine", hardening_warmup=10, epochs=50)
RECIPE_VARIANTS = {"fff": {}, "balance": dict(balance=0.1), "master-scalar": dict(master_leaf="scalar"),
                   "master-token": dict(master_leaf="token"), "reach": dict(hardening_mode="reach"),
                   "region-leak": dict(region_leak=0.1),
                   "reach+master-token+balance": dict(hardening_mode="reach", master_leaf="token", balance=0.1),
                   "hard-path": dict(train_mode="hard_path")}
# FF's best recipe on validation (better than RECIPE for FF, worse for FFF)
FF_RECIPE = dict(schedule="cosine", epochs=50, lr=0.05, momentum=0.9, weight_decay=5e-4)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per configuration (default 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed .. first-seed+seeds-1 (to split a grid over processes)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: per experiment)")
    p.add_argument("--epochs-fashion", type=int, default=10, help="table1: FashionMNIST epochs (default 10)")
    p.add_argument("--epochs-mnist", type=int, default=40, help="table1: MNIST-5k epochs (default 40)")
    p.add_argument("--datasets", default="fashion-mnist,mnist5k", help="table1: comma-separated datasets")
    p.add_argument("--widths", default="16,32,64,128", help="table1: training widths")
    p.add_argument("--leaves", default="1,2,4,8", help="table1: FFF leaf widths")
    p.add_argument("--limit", type=int, default=None, help="training rows per run (vit default 5000; 0 = all)")
    p.add_argument("--only", default=None,
                   help="comma-separated substrings: train only runs whose name contains one (report covers all)")
    p.add_argument("--runs", default="runs", help="parent directory of the run directories")
    p.add_argument("--results", default="docs/results", help="where the report goes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-report", action="store_true", help="only train")
    p.add_argument("--quiet", action="store_true")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def grid(args: argparse.Namespace) -> list[tuple[str, TrainConfig]]:
    """(run name, config) for every run of the experiment, seeds innermost-last."""
    runs: list[tuple[str, dict]] = []
    if args.name == "table1":
        for data in args.datasets.split(","):
            epochs = args.epochs or (args.epochs_fashion if data == "fashion-mnist" else args.epochs_mnist)
            tag = data if data in BUILTIN else Path(data).name                # run names for user paths
            for w in _ints(args.widths):
                runs.append((f"{tag}_ff_w{w}", dict(data=data, model="ff", width=w, epochs=epochs)))
                for leaf in _ints(args.leaves):
                    if leaf <= w:
                        runs.append((f"{tag}_fff_w{w}_l{leaf}",
                                     dict(data=data, model="fff", width=w, leaf=leaf, epochs=epochs)))
    elif args.name == "ablation":
        base = dict(data="fashion-mnist", model="fff", width=128, leaf=8, epochs=args.epochs or 10)
        variants = {"fff": {}, "balance": dict(balance=1.0), "master-scalar": dict(master_leaf="scalar"),
                    "master-token": dict(master_leaf="token"),
                    "balance+master-token": dict(balance=1.0, master_leaf="token"),
                    "region-leak": dict(region_leak=0.1),
                    "all": dict(balance=1.0, master_leaf="token", region_leak=0.1),
                    "hard-path": dict(train_mode="hard_path"),
                    "all+hard-path": dict(balance=1.0, master_leaf="token", region_leak=0.1, train_mode="hard_path")}
        runs = [(f"ablation_{k}", base | v) for k, v in variants.items()]
    elif args.name == "moe":
        base = dict(data="fashion-mnist", width=128, epochs=args.epochs or 10)
        runs = [("moe_ff", base | dict(model="ff")),
                ("moe_moe_e16_k1", base | dict(model="moe", leaf=16, top_k=1)),
                ("moe_moe_e16_k2", base | dict(model="moe", leaf=16, top_k=2)),
                ("moe_fff_l16", base | dict(model="fff", leaf=16))]   # FFF l=8 at w=128: see ablation
    elif args.name == "recipe":
        epochs = args.epochs or RECIPE["epochs"]     # a shorter run keeps its h ramp within the run
        data = dict(data="fashion-mnist", width=128)
        base = data | RECIPE | dict(epochs=epochs, hardening_warmup=min(RECIPE["hardening_warmup"], epochs))
        runs = [("recipe_ff", base | dict(model="ff")),
                ("recipe_ff-momentum", data | FF_RECIPE | dict(model="ff", epochs=epochs))]
        runs += [(f"recipe_{k}", base | dict(model="fff", leaf=8) | v) for k, v in RECIPE_VARIANTS.items()]
    else:  # vit
        limit = 5000 if args.limit is None else args.limit
        base = dict(data="fashion-mnist", arch="vit", width=128, epochs=args.epochs or 3, limit=limit or None,
                    activation="gelu", lr=0.05, momentum=0.9, hardening=0.5, hardening_mode="reach")
        runs = [("vit_ff", base | dict(model="ff")),
                ("vit_fff_l1_d7", base | dict(model="fff", leaf=1)),
                ("vit_fff_l8_d4", base | dict(model="fff", leaf=8))]
    if args.limit is not None and args.name != "vit":
        runs = [(n, c | dict(limit=args.limit or None)) for n, c in runs]
    return [(f"{name}_s{seed}", TrainConfig(**cfg, seed=seed).validate())
            for name, cfg in runs for seed in range(args.first_seed, args.first_seed + args.seeds)]


@torch.no_grad()
def ffn_seconds_per_token(model: TinyViT, x: torch.Tensor, repeats: int = 5) -> tuple[float, int]:
    """Eval-mode wall time of the first block's FFN alone, per token (median of ``repeats``), on
    the real FFN inputs that the images ``x`` (B, H*W) produce. Returns (seconds per token, tokens)."""
    model.eval()
    block = model.blocks[0]
    seen = []
    handle = block.ffn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    tokens = seen[0].reshape(-1, seen[0].shape[-1]).contiguous()
    seconds = median_times({"ffn": lambda: block.ffn(tokens)}, repeats, warmup=1)["ffn"]
    return seconds / len(tokens), len(tokens)


def save_ffn_timing(out: Path, model: TinyViT, data: Dataset, rows: int = 1000) -> None:
    """Write ``timing.json`` (FFN time per token) for a trained ViT run, timed on validation
    images so the test split stays untouched."""
    seconds, tokens = ffn_seconds_per_token(model, data.val.x[:rows])
    (Path(out) / "timing.json").write_text(json.dumps(
        {"ffn_seconds_per_token": seconds, "tokens": tokens, "threads": torch.get_num_threads(),
         "ffn_neurons_per_inference": model.blocks[0].ffn.neurons_per_inference}, indent=1))


def run(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..training.trainer import fit, save_run
    from .report import write_report

    set_threads(args.threads)
    root = Path(args.runs) / args.name
    todo = grid(args)
    if args.only:
        todo = [(n, c) for n, c in todo if any(part in n for part in args.only.split(","))]
    todo.sort(key=lambda item: (item[1].data, item[1].seed, item[1].limit or 0))  # load each split once
    cache: dict = {}
    for i, (name, cfg) in enumerate(todo, 1):
        out = root / name
        if (out / "metrics.json").exists():
            continue
        key = (cfg.data, cfg.seed, cfg.limit)
        if key not in cache:
            cache.clear()
            cache[key] = load_dataset(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, limit=cfg.limit)
        model, result = fit(cfg, cache[key], progress=not args.quiet)
        save_run(out, model, result)
        if cfg.arch == "vit":
            save_ffn_timing(out, model, cache[key])
        print(f"[{i}/{len(todo)}] {name}: GA {result.test['acc']:.2f}  MA {result.train_acc:.2f}  "
              f"({result.training_seconds:.0f}s)", flush=True)
    if not args.no_report:
        command = "fastff experiment " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index(args.name):]) \
            if args.name in sys.argv else f"fastff experiment {args.name}"
        write_report(root, Path(args.results), name=args.name, command=command)
    return 0
