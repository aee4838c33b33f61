"""`fastff train`: train one model, select it on validation, test it once, save the run."""
from __future__ import annotations

import argparse

from ..layers.families import FAMILIES
from ..training.routing_init import ROUTING_INITS
from ..training.run import SCHEDULES, run_mode
from ..training.trainer import ARCHS, OPTIMIZERS, SELECT, TrainConfig
from .arguments import add_ffn_options, add_run_dir, add_threads, apply_threads, ffn_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(data="")
    p.add_argument("--data", required=True,
                   help="fashion-mnist | mnist5k | digits | path to an IDX directory, .npz or .csv file")
    p.add_argument("--ffn", "--model", choices=sorted(FAMILIES) + ["ff"], default=d.ffn, dest="ffn",
                   help="the feedforward family ('ff' = dense, the name of earlier runs; --model is the old name "
                        "of this flag)")
    p.add_argument("--arch", choices=ARCHS, default=d.arch,
                   help="mlp: the layer maps pixels to classes (FFF paper Table 1); vit: a small ViT whose "
                        "feedforwards are the layer")
    p.add_argument("--width", type=int, default=d.width, help="training width w (FFF: 2^depth * leaf)")
    add_ffn_options(p)
    p.add_argument("--hardening", type=float, default=d.hardening, help="h, weight of the node-entropy loss")
    p.add_argument("--hardening-mode", choices=("mean", "reach"), default=d.hardening_mode,
                   help="mean: the FFF paper's loss; reach: entropy weighted by the mass reaching each node")
    p.add_argument("--hardening-warmup", type=int, default=d.hardening_warmup,
                   help="epochs over which h ramps linearly from 0 to --hardening (0 = full h from the start)")
    p.add_argument("--balance", type=float, default=d.balance, help="load-balancing alpha (0 = off)")
    p.add_argument("--routing-init", choices=ROUTING_INITS, default=d.routing_init,
                   help="FFF node initialisation: none (random) or pca (every node a balanced split of the "
                        "training rows that reach it)")
    p.add_argument("--vit-dim", type=int, default=d.vit_dim)
    p.add_argument("--vit-layers", type=int, default=d.vit_layers)
    p.add_argument("--vit-heads", type=int, default=d.vit_heads)
    p.add_argument("--patch", type=int, default=d.patch)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="local-sgd / local-adam: localised optimisation (each leaf, node or neuron steps once "
                        "its usage reaches --local-batch-size rows)")
    p.add_argument("--local-batch-size", type=float, default=d.local_batch_size,
                   help="local-sgd / local-adam: rows a block must see before it steps")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="L2 penalty (sgd, adam) / decoupled weight decay (adamw)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning-rate decay per step after the warm-up: none, cosine (to 0), "
                        "step (x0.1 at 50%% and 75%% of the steps)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="epochs of linear learning-rate warm-up")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without validation improvement (0 = never)")
    p.add_argument("--select", choices=SELECT, default=d.select,
                   help="model-selection split; only 'val' exists: the test split is evaluated once, after "
                        "selection, and can never be used to pick a checkpoint")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=None, help="use only this many training rows")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between resumable checkpoints")
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_dir(p)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names and k != "ffn_options"}
    return TrainConfig(**values, ffn_options=ffn_options(args, args.ffn)).validate()


def run(args: argparse.Namespace) -> int:
    import sys

    from ..data import load_dataset
    from ..training.trainer import fit

    apply_threads(args)
    cfg = config_from_args(args)
    mode = run_mode(args.resume, args.overwrite)
    data = load_dataset(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, limit=cfg.limit)
    model, result = fit(cfg, data, args.out, mode, progress=not args.quiet, checkpoint_every=args.checkpoint_every)
    if result.stopped:
        print(f"warning: {result.stopped}; the run keeps the best model before it", file=sys.stderr)
    val = result.epochs[result.best_epoch - 1]["val_acc"] if result.best_epoch else float("nan")
    print(f"{args.out}: best epoch {result.best_epoch}/{len(result.epochs)}  train(MA) {result.train_acc:.2f}  "
          f"val {val:.2f}  test(GA) {result.test['acc']:.2f}  "
          f"neurons/inference {result.neurons_per_inference}")
    return 0
