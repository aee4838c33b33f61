"""`fastff lm experiment`: dense vs tree feedforwards in a character-level GPT, the grid behind
docs/lm.md. Runs go to ``<runs>/<stage>_<variant>_s<seed>/``; a run whose metrics.json exists is
skipped, so an interrupted grid resumes where it stopped.

Stages (all on Shakespeare's complete works, the same model shape and recipe):

1. ``tune``: the learning rate of each family (``TUNE_FAMILIES``), picked by validation loss after
   ``--tune-steps`` steps among ``--lrs`` (seed 0);
2. ``steptime``: training-step times of every variant at the experiment shape, interleaved in one
   process (``fastff lm bench --train``), saved to ``steptime.json``;
3. ``steps``: every variant for ``--steps`` steps (equal steps), ``--seeds`` seeds for the main rows
   (``MAIN``), seed 0 for the others;
4. ``time``: equal wall-clock: every variant trains for as many steps as fit in the dense model's
   ``--steps`` steps, by the step times of stage 2 (dense itself: its ``steps`` runs);
5. ``ablation``: neuron-tree 1x11 variations (``ABLATIONS``) at ``--steps`` steps, seed 0.

Then the report: docs/results/lm.md, lm.json (one object per run) and plots (``--stages report``:
only the report, from the finished runs).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ..data.text import load_shakespeare, load_text, split_text
from .arguments import add_threads
from .lm_grid import Grid, load_runs

# name -> (family, GPTConfig feedforward fields, LMTrainConfig overrides)
VARIANTS = {
    "dense": ("dense", dict(ffn="dense", ffn_width=1024), {}),
    "dense-small": ("dense-small", dict(ffn="dense", ffn_width=12), {}),
    # dense FFNs as wide as the 4x8 / 16x5 trees' neurons per token (36, 96), with dense-small's lr
    "dense-36": ("dense-small", dict(ffn="dense", ffn_width=36), {}),
    "dense-96": ("dense-small", dict(ffn="dense", ffn_width=96), {}),
    "neuron-tree-1x11": ("neuron-tree", dict(ffn="neuron-tree", ffn_width=4095, ffn_options=dict(depth=11)), {}),
    "neuron-tree-1x10": ("neuron-tree", dict(ffn="neuron-tree", ffn_width=2047, ffn_options=dict(depth=10)), {}),
    "neuron-tree-4x8": ("neuron-tree", dict(ffn="neuron-tree", ffn_width=2044, ffn_options=dict(trees=4, depth=8)),
                        {}),
    "fff": ("fff", dict(ffn="fff", ffn_width=1024, ffn_options=dict(leaf=8, train_mode="hard_path")),
            dict(balance=0.01)),
    "moe": ("moe", dict(ffn="moe", ffn_width=1024, ffn_options=dict(leaf=64, top_k=1)), dict(balance=0.01)),
}
MAIN = ("dense", "dense-small", "neuron-tree-1x11")
STAGES = ("tune", "steptime", "steps", "time", "ablation", "report")
SHORT_LRS = "1e-3,2e-3,4e-3"   # learning rates the short regime searches per family
TUNE_FAMILIES = {"dense": "dense", "dense-small": "dense-small", "neuron-tree": "neuron-tree-1x11",
                 "fff": "fff", "moe": "moe"}
# neuron-tree 1x11 variations: name -> (feedforward fields, training overrides)
ABLATIONS = {
    "lr-2e-3-ffn-x0.5": ({}, dict(lr=2e-3, ffn_lr_mult=0.5)),    # the dense model's lr outside the tree
    "ffn-lr-x4": ({}, dict(ffn_lr_mult=4.0)),      # each tree neuron sees few tokens: larger steps inside the tree
    "local-adam": ({}, dict(optimizer="local-adam", weight_decay=0.0)),
    "long-warmup": ({}, dict(warmup=300)),
    "2x10": (dict(ffn_width=4094, ffn_options=dict(trees=2, depth=10)), {}),
    "16x5": (dict(ffn_width=1008, ffn_options=dict(trees=16, depth=5)), {}),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regime", choices=("short", "long"), default="short",
                   help="short: this module's 600-step grid (docs/lm.md); long: 10M tokens per run at dim 128, "
                        "where conditional capacity can pay (fastff.apps.lm_capacity, docs/lm_long.md)")
    from .lm_capacity import add_arguments as add_long_arguments
    add_long_arguments(p)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--text", default=None, help="UTF-8 file or directory (default: Shakespeare's complete works)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of the equal-steps runs (default 600; --regime long: 5000)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the main rows")
    p.add_argument("--tune-steps", type=int, default=None,
                   help="steps of the learning-rate search runs (default 400; --regime long: 1000)")
    p.add_argument("--lrs", default=None,
                   help="comma-separated learning rates searched per family (default 1e-3,2e-3,4e-3; "
                        "--regime long: 1e-3,2e-3,4e-3,8e-3)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated stages to run, of {','.join(STAGES)} (default: all but report; 'report' alone: "
                        "only the report; the report always covers every finished run); --regime long: "
                        "tune,main,ablation,report (default: all)")
    p.add_argument("--only", default=None, help="comma-separated variant names: run only these")
    p.add_argument("--ablations", default=None,
                   help=f"comma-separated subset of the ablation stage's runs (default: all of {','.join(ABLATIONS)})")
    p.add_argument("--runs", default=None,
                   help="parent directory of the run directories (default runs/lm; --regime long: docs/results/lm_long_runs, "
                        "whose weights and checkpoints are git-ignored)")
    p.add_argument("--results", default="docs/results", help="where lm.md, lm.json and the plots go")
    add_threads(p)
    p.add_argument("--quiet", action="store_true")


def _shape(args) -> dict:
    return dict(layers=args.layers, dim=args.dim, heads=args.heads, context=args.context)


def _variant(name: str) -> tuple[str, dict, dict]:
    """(family, feedforward fields, training overrides) of a variant or an ablation
    (``ablation:<name>``, a variation of neuron-tree 1x11)."""
    if name.startswith("ablation:"):
        family, fields, train = VARIANTS["neuron-tree-1x11"]
        extra_fields, extra_train = ABLATIONS[name.split(":", 1)[1]]
        return family, fields | extra_fields, train | extra_train
    return VARIANTS[name]


def tuned_lr(grid: Grid, family: str) -> float:
    """The searched lr with the lowest validation loss for ``family`` (tune stage runs)."""
    best = min((grid.train(f"tune_{TUNE_FAMILIES[family]}_lr{lr:g}_s0", TUNE_FAMILIES[family],
                           grid.args.tune_steps, 0, lr)["val_loss"], lr) for lr in _floats(grid.args.lrs or SHORT_LRS))
    return best[1]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def run(args) -> int:
    if args.regime == "long":
        from .lm_capacity import run as run_long
        return run_long(args)
    args.stages = args.stages or ",".join(STAGES[:-1])
    args.steps, args.tune_steps, args.runs = args.steps or 600, args.tune_steps or 400, args.runs or "runs/lm"
    ablations = args.ablations.split(",") if args.ablations else list(ABLATIONS)
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"--ablations: unknown {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    splits = split_text(load_shakespeare() if args.text is None else load_text(args.text))
    grid = Grid(args, splits, _variant)
    stages = set(args.stages.split(","))
    if not stages <= set(STAGES):
        raise ValueError(f"--stages: unknown {', '.join(sorted(stages - set(STAGES)))}; choose from {', '.join(STAGES)}")
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    lrs = {}

    def lr_of(variant: str) -> float:
        family = _variant(variant)[0]
        if family not in lrs:
            lrs[family] = tuned_lr(grid, family) if "tune" in stages else _read_tuned(grid.root, family)
        return lrs[family]

    if stages & {"tune", "steps", "time", "ablation"}:
        for name in names:          # every learning rate first: the tune stage runs before any training
            lr_of(name)
    times = grid.step_times(sorted({"dense", *names})) if "steptime" in stages or "time" in stages else None
    if "steps" in stages:
        for name in names:
            for seed in range(args.seeds if name in MAIN else 1):
                grid.train(f"steps_{name}_s{seed}", name, args.steps, seed, lr_of(name))
    if "time" in stages:
        for name in names:
            if name == "dense":
                continue
            steps = max(1, round(args.steps * times["dense"] / times[name]))
            for seed in range(args.seeds if name in MAIN else 1):
                grid.train(f"time_{name}_s{seed}", name, steps, seed, lr_of(name))
    if "ablation" in stages:
        for ablation in ablations:
            grid.train(f"ablation_{ablation}_s0", f"ablation:{ablation}", args.steps, 0, lr_of("neuron-tree-1x11"))
    write_report(grid.root, Path(args.results), getattr(args, "command_line", "fastff lm experiment"), _shape(args))
    return 0


def _read_tuned(root: Path, family: str) -> float:
    """The best lr of ``family`` among its finished tune runs."""
    runs = [(json.loads((d / "metrics.json").read_text())["val_loss"], json.loads((d / "config.json").read_text())["train"]["lr"])
            for d in root.glob(f"tune_{TUNE_FAMILIES[family]}_lr*") if (d / "metrics.json").exists()]
    if not runs:
        raise FileNotFoundError(f"no finished tune runs for {family} under {root}: run the 'tune' stage first")
    return min(runs)[1]


# ----------------------------------------------------------------------------- report

def run_records(runs: list[dict]) -> list[dict]:
    """One flat object per run (the rows of lm.json)."""
    out = []
    for r in runs:
        m, c = r["metrics"], r["config"]
        layers = c["model"]["layers"]
        out.append({"run": r["name"], "stage": r["stage"], "variant": r["variant"], "ffn": c["model"]["ffn"],
                    "seed": r["seed"], "steps": c["train"]["steps"], "lr": c["train"]["lr"],
                    "val_loss": m["val_loss"], "test_loss": m["test_loss"], "best_step": m["best_step"],
                    "train_seconds": m["train_seconds"], "ms_per_step": m["ms_per_step"],
                    "neurons_per_token": m["ffn_neurons_per_token"] // layers,
                    "training_width": m["ffn_training_width"] // layers, "n_params": m["n_params"]})
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _table(records: list[dict], stage: str) -> list[str]:
    lines = ["| variant | seeds | neurons / token | training width | steps | lr | val loss | test loss | "
             "train s | ms / step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}     # (variant, lr) -> its seeds
    for r in records:
        if r["stage"] == stage:
            groups.setdefault((r["variant"], r["lr"]), []).append(r)
    for (variant, _), rs in groups.items():
        r0 = rs[0]
        lines.append(f"| {variant} | {len(rs)} | {r0['neurons_per_token']} | {r0['training_width']} | {r0['steps']} | "
                     f"{r0['lr']:g} | {_mean_std([r['val_loss'] for r in rs])} | "
                     f"{_mean_std([r['test_loss'] for r in rs])} | {statistics.mean(r['train_seconds'] for r in rs):.0f} | "
                     f"{statistics.mean(r['ms_per_step'] for r in rs):.0f} |")
    return lines


def _plots(runs: list[dict], out: Path, step_seconds: dict | None) -> list[Path]:
    """Validation loss vs steps and vs training time, loss vs neurons per token. The time axis is
    steps x the variant's interleaved step time (``step_seconds``, from steptime.json); without
    step times, the runs' measured wall-clock (which other jobs on the machine change). A variant
    without a step time is left out of the time plot rather than put on another clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed0 = [r for r in runs if r["seed"] == 0 and r["stage"] in ("steps", "time")]
    variants = list(dict.fromkeys(r["variant"] for r in seed0))
    color = {v: plt.get_cmap("tab20")(i % 20) for i, v in enumerate(variants)}
    if step_seconds:
        timed = [r for r in seed0 if r["variant"] in step_seconds]
        seconds = lambda r, e: e["step"] * step_seconds[r["variant"]]
        time_label = "training time (s): steps x interleaved step time"
    else:
        timed, seconds, time_label = seed0, (lambda r, e: e["seconds"]), "training wall-clock (s)"
    files = []
    for shown, x_of, label, name in ((seed0, lambda r, e: e["step"], "training step", "lm_val_vs_steps.png"),
                                     (timed, seconds, time_label, "lm_val_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in shown:
            h = r["metrics"]["history"]
            ax.plot([x_of(r, e) for e in h], [e["val_loss"] for e in h], marker=".", color=color[r["variant"]],
                    linestyle="-" if r["stage"] == "steps" else "--", label=f"{r['variant']} ({r['stage']})")
        ax.set(xlabel=label, ylabel="validation loss (nats / char)", title=f"validation loss vs {label.split(' (')[0]} (seed 0)")
        ax.grid(alpha=0.3)
        if shown:
            ax.legend(fontsize=6)
        fig.tight_layout()
        files.append(out / name)
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    # equal-steps runs and the ablations (same steps): one point per variant, mean over seeds;
    # the dense widths joined by a line, the front a tree has to beat
    records = run_records([r for r in runs if r["stage"] in ("steps", "ablation")])
    points = {}
    for r in records:
        points.setdefault((r["variant"], r["ffn"], r["neurons_per_token"]), []).append(r["val_loss"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense = sorted((n, statistics.mean(v)) for (_, ffn, n), v in points.items() if ffn == "dense")
    if dense:
        ax.plot(*zip(*dense), color="black", marker="o", label="dense (width = neurons per token)")
    for (variant, ffn, n), v in points.items():
        if ffn != "dense":
            ax.scatter([n], [statistics.mean(v)], label=variant, zorder=3)
    ax.set(xscale="log", xlabel="feedforward neurons per token (per layer)", ylabel="validation loss (equal steps)",
           title="loss vs feedforward neurons evaluated per token")
    ax.grid(alpha=0.3, which="both")
    if records:
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "lm_loss_vs_neurons.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def write_report(root: Path, out: Path, command: str, shape: dict) -> Path:
    """docs/results/lm.md (tables), lm.json (one object per run) and the plots."""
    runs = load_runs(root)
    records = run_records(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm.json").write_text(json.dumps(records, indent=1))
    steptime = json.loads((root / "steptime.json").read_text()) if (root / "steptime.json").exists() else None
    plots = _plots(runs, out, steptime and steptime["seconds"])
    text = ["# Language modelling with tree feedforwards\n", f"Command: `{command}`\n",
            f"{len(runs)} runs under `{root}`. Model: {shape['layers']} layers, dim {shape['dim']}, "
            f"{shape['heads']} heads, context {shape['context']}; character-level text; losses in nats per "
            "character, measured in eval mode (hard routing on fastff's kernels) on fixed windows; the checkpoint "
            "with the lowest validation loss is kept and the test split is evaluated once per run. `train s` and "
            "`ms / step` are each run's measured wall-clock, which moves with other jobs on the machine; the equal "
            "wall-clock budgets come from the interleaved step times of the last table.\n"]
    for stage, title in (("steps", "Equal steps"), ("time", "Equal wall-clock (steps that fit in the dense model's time)"),
                         ("ablation", "Neuron-tree 1x11 ablations (equal steps, seed 0)"),
                         ("tune", "Learning-rate search (seed 0)")):
        if any(r["stage"] == stage for r in records):
            # the budget of the equal wall-clock runs is the dense model's equal-steps time: its row heads the table
            reference = [dict(r, stage="time") for r in records if stage == "time" and r["stage"] == "steps"
                         and r["variant"] == "dense"]
            text += [f"## {title}\n", *_table(reference + records, stage), ""]
    if steptime:
        s = steptime["seconds"]
        rest = s["no-ffn"]
        text += ["## Training-step time: feedforward vs the rest\n",
                 f"Interleaved medians in one process (batch {steptime['batch']}, torch threads {steptime['threads']}, load "
                 f"average {steptime['load_average']:.2f}); 'rest' = the same model without feedforwards.\n",
                 "| variant | ms / step | feedforward ms | rest ms | vs dense |", "|---|---:|---:|---:|---:|"]
        text += [f"| {n} | {1e3 * t:.0f} | {1e3 * (t - rest):.0f} | {1e3 * rest:.0f} | {s['dense'] / t:.2f}x |"
                 for n, t in s.items()]
        text.append("")
    text += [f"![{p.stem}]({p.name})" for p in plots]
    md = out / "lm.md"
    md.write_text("\n".join(text) + "\n")
    return md
