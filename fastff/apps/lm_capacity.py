"""`fastff lm experiment --regime long`: the regime where conditional capacity can pay.

A 4-layer, dim-128 character GPT (full dense FFN 512 neurons) trained 5000 steps of 16 x 128
tokens (10.2M tokens) per run, long enough that conditional layers (MoE, trees, product keys)
can use their width. Stages:

- ``tune``: learning rates {1e-3, 2e-3, 4e-3, 8e-3} per tuning group, 1000 steps, the first corpus
  validation only, seed 0;
- ``main``: the main rows (``MAIN``), every corpus of ``--corpora`` x ``--seeds`` seeds;
- ``ablation``: the tree remedies (``ABLATIONS``), Shakespeare, seed 0;
- ``control``: the MoE control, its dense FFN of equal active neurons, the best trees, the full
  dense FFN and the dense FFNs of the trees' neurons per token trained 3x longer (``CONTROL_STEPS``),
  every corpus of ``--corpora`` x ``--seeds`` seeds (pick rows with ``--only``, corpora with
  ``--corpora``): is the regime capacity-bound when longer?
- ``steptime``: training-step time of every variant and ablation, interleaved in one process
  (the first corpus's steptime.json), for the equal-wall-clock comparison;
- ``front``: validation loss and batch-1 decoding speed of every trained seed-0 model of the first
  corpus whose weights are in its run directory, float and int8, interleaved in one process
  (front.json): the front a user picks from;
- ``report``: tables (mean ± std over seeds), capacity diagnostics per variant (units reached
  at the deepest level, dead units, per layer), the auto-pruning curves (dead fraction vs step),
  the front and the targets, into ``--results``/lm_long.md.

Every run is a run directory of the run core: finished runs are skipped, interrupted ones resume
from their checkpoint, so the grid continues where it stopped. The MoE control must beat the
dense FFN of equal active neurons by more than seed noise, or the regime is not capacity-bound.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from ..data.text import CORPORA, load_corpus, split_text
from ..models.quantize import quantize_int8
from ..training.lm import eval_windows, evaluate, load_run
from ..training.run import read_json
from .lm_grid import Grid, decode_seconds, load_runs

SHAPE = dict(layers=4, dim=128, heads=4, context=128)
BATCH, STEPS, TUNE_STEPS, EVALS = 16, 5000, 1000, 20
LRS = (1e-3, 2e-3, 4e-3, 8e-3)
FULL_DENSE = 512

# name -> (tuning group, GPTConfig feedforward fields, LMTrainConfig overrides)
VARIANTS = {
    "dense-512": ("dense", dict(ffn="dense", ffn_width=512), {}),
    "dense-48": ("dense-small", dict(ffn="dense", ffn_width=48), {}),
    "dense-32": ("dense-small", dict(ffn="dense", ffn_width=32), {}),
    "dense-20": ("dense-small", dict(ffn="dense", ffn_width=20), {}),
    # MoE control: 16 experts of 32, top-1: 16 router + 32 expert neurons per token (= dense-48)
    "moe-16x32": ("moe", dict(ffn="moe", ffn_width=512, ffn_options=dict(leaf=32, top_k=1)), dict(balance=0.01)),
    # the MoE control at half its tuned lr (tuned on 1000 steps, one step below the lr that diverged)
    "moe-16x32-lr2e-3": ("moe", dict(ffn="moe", ffn_width=512, ffn_options=dict(leaf=32, top_k=1)),
                         dict(balance=0.01, lr=2e-3)),
    # its rival at the same lr (is 2e-3 better for a narrow dense FFN too, when trained this long?),
    # and the 3-tree recipe's rival at it
    "dense-48-lr2e-3": ("dense-small", dict(ffn="dense", ffn_width=48), dict(lr=2e-3)),
    "dense-32-lr2e-3": ("dense-small", dict(ffn="dense", ffn_width=32), dict(lr=2e-3)),
    "neuron-tree-1x9": ("neuron-tree", dict(ffn="neuron-tree", ffn_width=1023, ffn_options=dict(depth=9)), {}),
    "neuron-tree-2x9": ("neuron-tree", dict(ffn="neuron-tree", ffn_width=2046, ffn_options=dict(trees=2, depth=9)),
                        {}),
    # product keys (PEER): key_heads·(top_k + key_dim + n_keys) neurons per token: 1·(8 + 8 + 16) = 32
    "pk-1x8-n16": ("product-key", dict(ffn="product-key", ffn_width=256,
                                       ffn_options=dict(key_heads=1, top_k=8, key_dim=8)), {}),
    # FFF trained on its hard path, gate-scaled leaves: 4 nodes + 16 leaf neurons = 20 per token
    "fff-d4-l16": ("fff", dict(ffn="fff", ffn_width=256, ffn_options=dict(leaf=16, train_mode="hard_path")),
                   dict(balance=0.01)),
}
# nt-2x9-gate-node-balance, nt-3x9-gate-node-balance and its ffn-x2 variant: the best trees of the
# ablations (seed 0) at 20 and 30 neurons per token, promoted to the main rows (dense-32 stands for
# their dense rival at 30)
MAIN = ("dense-512", "dense-20", "dense-32", "dense-48", "moe-16x32", "fff-d4-l16", "neuron-tree-2x9",
        "nt-2x9-gate-node-balance", "nt-3x9-gate-node-balance", "nt-3x9-gate-node-balance-ffn-x2", "pk-1x8-n16")


def _three_trees(gate: str = "path", **overrides) -> tuple[str, dict, dict]:
    """An ablation entry of the 3-tree recipe: 3 NeuronTrees of depth 9 (30 of 3069 neurons per
    token) with ``gate`` and the node-balance loss (0.01 unless ``overrides`` says otherwise)."""
    return ("neuron-tree-2x9", dict(ffn_width=3 * 1023, ffn_options=dict(trees=3, depth=9, gate=gate)),
            dict(balance=0.01) | overrides)


# tree remedies and shapes, each a variation of a MAIN tree: name -> (base variant, fields, overrides)
ABLATIONS = {
    "neuron-tree-1x9": ("neuron-tree-1x9", {}, {}),
    "nt-2x9-tanh": ("neuron-tree-2x9", dict(ffn_options=dict(trees=2, depth=9, activation="tanh")), {}),
    "nt-2x9-identity": ("neuron-tree-2x9", dict(ffn_options=dict(trees=2, depth=9, activation="identity")), {}),
    "nt-4x7": ("neuron-tree-2x9", dict(ffn_width=1020, ffn_options=dict(trees=4, depth=7)), {}),
    "nt-2x9-local-adam": ("neuron-tree-2x9", {}, dict(optimizer="local-adam", weight_decay=0.0)),
    "nt-2x9-route-bias": ("neuron-tree-2x9", dict(ffn_options=dict(trees=2, depth=9, route_bias=1e-3)), {}),
    "nt-2x9-gate": ("neuron-tree-2x9", dict(ffn_options=dict(trees=2, depth=9, gate="path")), {}),
    "nt-2x9-gate-route-bias": ("neuron-tree-2x9", dict(ffn_options=dict(trees=2, depth=9, gate="path",
                                                                        route_bias=1e-3)), {}),
    "nt-2x9-node-balance": ("neuron-tree-2x9", {}, dict(balance=0.01)),
    "nt-2x9-gate-node-balance": ("neuron-tree-2x9", dict(ffn_options=dict(trees=2, depth=9, gate="path")),
                                 dict(balance=0.01)),
    # the winning recipe on 4 shallower trees: 4 x 8 = 32 neurons per token (against dense-32)
    "nt-4x7-gate-node-balance": ("neuron-tree-2x9", dict(ffn_width=1020, ffn_options=dict(trees=4, depth=7,
                                                                                          gate="path")),
                                 dict(balance=0.01)),
    # the winning recipe at twice its group's tuned learning rate (tuned on the plain tree)
    "nt-2x9-gate-node-balance-lr4e-3": ("neuron-tree-2x9", dict(ffn_options=dict(trees=2, depth=9, gate="path")),
                                        dict(balance=0.01, lr=4e-3)),
    # the winning recipe on 3 trees: 30 neurons per token, 3069 in all
    "nt-3x9-gate-node-balance": _three_trees(),
    "nt-3x9-gate-node-balance-lr4e-3": _three_trees(lr=4e-3),
    # the 3-tree recipe at lr 4e-3 with a 3x stronger node balance (lr 4e-3 alone lost reach: 0.77)
    "nt-3x9-gate-node-balance-lr4e-3-b0.03": _three_trees(balance=0.03, lr=4e-3),
    # the 3-tree recipe with twice the lr inside the trees only (each deep neuron sees few tokens)
    "nt-3x9-gate-node-balance-ffn-x2": _three_trees(ffn_lr_mult=2.0),
    # further along the ffn-x2 line: 4x the lr inside the trees, at the rest's 2e-3 or at 1e-3
    "nt-3x9-gate-node-balance-ffn-x4": _three_trees(ffn_lr_mult=4.0),
    "nt-3x9-gate-node-balance-lr1e-3-ffn-x4": _three_trees(lr=1e-3, ffn_lr_mult=4.0),
    # the 3-tree recipe with the full dense model's lr (8e-3) outside the trees: 2e-3 or 4e-3 inside them
    "nt-3x9-gate-node-balance-lr8e-3-ffn-x0.25": _three_trees(lr=8e-3, ffn_lr_mult=0.25),
    "nt-3x9-gate-node-balance-lr8e-3-ffn-x0.5": _three_trees(lr=8e-3, ffn_lr_mult=0.5),
    # the 3-tree recipe with the straight-through gate: the path gate's gradient, the plain tree's forward
    "nt-3x9-straight-through-node-balance": _three_trees(gate="straight-through"),
    # the 3-tree recipe without weight decay (AdamW's decay shrinks every neuron each step, while a
    # deep neuron learns from ~1/512 of the tokens)
    "nt-3x9-gate-node-balance-wd0": _three_trees(weight_decay=0.0),
    # a shared, always-on dense slice beside 2 gated trees (a shared expert): 20 + 12 = 32 per token
    "nt-2x9-gate-node-balance-slice-12": ("neuron-tree-2x9", dict(ffn_width=2 * 1023 + 12,
                                                                  ffn_options=dict(trees=2, depth=9, gate="path",
                                                                                   dense_slice=12)),
                                          dict(balance=0.01)),
    # the winning recipe on 2 deeper trees: 22 neurons per token, 4094 in all
    "nt-2x10-gate-node-balance": ("neuron-tree-2x9", dict(ffn_width=2 * 2047, ffn_options=dict(trees=2, depth=10,
                                                                                               gate="path")),
                                  dict(balance=0.01)),
    # 2 trees of depth 8 (18 neurons) + an always-on dense slice of 12 = 30 per token
    "nt-2x8-slice-12": ("neuron-tree-2x9", dict(ffn_width=2 * 511 + 12,
                                                ffn_options=dict(trees=2, depth=8, dense_slice=12)), {}),
    # product keys at 48 neurons per token (the MoE control's active width): 1·(16 + 16 + 16)
    "pk-1x16-n16": ("pk-1x8-n16", dict(ffn_options=dict(key_heads=1, top_k=16, key_dim=16)), {}),
    # product keys with a batch-normalised query (PEER's remedy for never-retrieved experts)
    "pk-1x8-n16-batch-norm": ("pk-1x8-n16", dict(ffn_options=dict(key_heads=1, top_k=8, key_dim=8,
                                                                  query_norm="batch")), {}),
    # the rivals with the trees' best lr change (twice the lr inside the feedforward layers)
    "dense-512-ffn-x2": ("dense-512", {}, dict(ffn_lr_mult=2.0)),
    "dense-32-ffn-x2": ("dense-32", {}, dict(ffn_lr_mult=2.0)),
    # the other way round: half the lr inside the full dense FFN (its attention keeps 8e-3)
    "dense-512-ffn-x0.5": ("dense-512", {}, dict(ffn_lr_mult=0.5)),
    "fff-d4-l16-no-balance": ("fff-d4-l16", {}, dict(balance=0.0)),
    "fff-d4-l32": ("fff-d4-l16", dict(ffn_width=512, ffn_options=dict(leaf=32, train_mode="hard_path")), {}),
}
# the longer control: the MoE control against its dense FFN of equal active neurons, the best tree
# against the full dense FFN and the dense FFN of its neurons per token
CONTROL = ("moe-16x32", "dense-48", "nt-2x9-gate-node-balance", "nt-3x9-gate-node-balance", "dense-512", "dense-20",
           "dense-32", "moe-16x32-lr2e-3", "dense-48-lr2e-3", "dense-32-lr2e-3")
MOE_CONTROLS = tuple(name for name in CONTROL if VARIANTS.get(name, ("",))[0] == "moe")
CONTROL_FACTOR = 3                    # the control trains this many times the main rows' steps
CONTROL_STEPS = CONTROL_FACTOR * STEPS
STAGES = ("tune", "main", "ablation", "control", "steptime", "front", "report")
# batch-1 decoding after a 64-token prompt (at most half the context), 64 tokens per timed call
FRONT_PROMPT, FRONT_NEW_TOKENS, FRONT_REPEATS = 64, 64, 21
# Run directories live in the repository (their weights and checkpoints are git-ignored there), so
# the finished runs' configs and metrics are committed and a later checkout skips them.
RUNS = "docs/results/lm_long_runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The long regime's own options (``fastff lm experiment --regime long``)."""
    p.add_argument("--corpora", default="shakespeare,fortunes",
                   help=f"comma-separated corpora of the main rows (of {', '.join(CORPORA)}); the first tunes")


def variant_of(name: str) -> tuple[str, dict, dict]:
    """(tuning group, feedforward fields, training overrides) of a variant or an ablation."""
    if name in ABLATIONS:
        base, fields, overrides = ABLATIONS[name]
        group, base_fields, base_overrides = VARIANTS[base]
        return group, base_fields | fields, base_overrides | overrides
    return VARIANTS[name]


def _shape_args(args) -> None:
    for k, v in SHAPE.items():
        setattr(args, k, v)
    args.batch = BATCH


def run(args) -> int:
    _shape_args(args)   # the regime fixes the model shape and batch
    lrs_given = [float(v) for v in args.lrs.split(",") if v.strip()] if args.lrs else list(LRS)
    stages = set(args.stages.split(",")) if args.stages else set(STAGES)
    if not stages <= set(STAGES):
        raise ValueError(f"--stages: unknown {', '.join(sorted(stages - set(STAGES)))} for --regime long; choose from "
                         f"{', '.join(STAGES)}")
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    unknown = sorted(set(corpora) - set(CORPORA))
    if unknown or not corpora:
        raise ValueError(f"--corpora: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CORPORA)}")
    only = set(args.only.split(",")) if args.only else None
    steps, tune_steps = args.steps or STEPS, args.tune_steps or TUNE_STEPS
    root = Path(args.runs or RUNS)
    grids = {c: Grid(_args_for(args, root / c), split_text(load_corpus(c)), variant_of, EVALS, c) for c in corpora}
    tune = grids[corpora[0]]
    lrs: dict[str, float] = {}

    def lr_of(variant: str) -> float:
        group = variant_of(variant)[0]
        if group not in lrs:
            searched = [(tune.train(f"tune_{group}_lr{lr:g}_s0", _tuned_variant(group), tune_steps, 0, lr)["val_loss"], lr)
                        for lr in lrs_given] if "tune" in stages else _finished_tune(tune.root, group)
            lrs[group] = min(searched)[1]
        return lrs[group]

    wanted = lambda name: only is None or name in only
    if "main" in stages:
        for seed in range(args.seeds):                  # seed-major: every row gets its first seed first
            for corpus, grid in grids.items():
                for name in filter(wanted, MAIN):
                    # an ablation promoted to the main rows keeps its ablation run as seed 0 of the first corpus
                    stage = "ablation" if name in ABLATIONS and seed == 0 and corpus == corpora[0] else "main"
                    grid.train(f"{stage}_{name}_s{seed}", name, steps, seed, lr_of(name))
    if "ablation" in stages:
        for name in filter(wanted, ABLATIONS):
            tune.train(f"ablation_{name}_s0", name, steps, 0, lr_of(name))
    if "control" in stages:
        for seed in range(args.seeds):                  # seed-major, as the main rows
            for grid in grids.values():
                for name in filter(wanted, CONTROL):
                    grid.train(f"control_{name}_s{seed}", name, CONTROL_FACTOR * steps, seed, lr_of(name))
    if "steptime" in stages:
        tune.step_times([*MAIN, *ABLATIONS])
    if "front" in stages:
        measure_front(tune)
    write_report(root, corpora, Path(args.results), getattr(args, "command_line", "fastff lm experiment --regime long"))
    return 0


def measure_front(grid: Grid) -> Path:
    """Validation loss and batch-1 decoding seconds per token of every finished seed-0 main or
    ablation model under ``grid.root`` whose weights are there, float and int8 (dense models: every
    linear layer; the others: attention and head, their feedforwards stay float), decoding
    interleaved in one process -> ``grid.root``/front.json. A front.json that already holds every
    such model is kept (delete it to measure again)."""
    runs = [r for r in load_runs(grid.root) if r["seed"] == 0 and r["stage"] in ("main", "ablation")
            and (grid.root / r["name"] / "model.safetensors").exists()]
    if not runs:
        raise FileNotFoundError(f"no trained seed-0 model with its weights under {grid.root}: run 'main' first")
    path = grid.root / "front.json"
    if path.exists() and {r["variant"] for r in runs} <= {r["variant"] for r in read_json(path)["rows"]}:
        return path
    models, rows = {}, {}
    for r in runs:
        model, _, config = load_run(grid.root / r["name"])
        train = config["train"]
        windows = eval_windows(grid.splits.val, model.cfg.context, train["eval_batches"] * train["batch_size"])
        dense = config["model"]["ffn"] == "dense"
        for name, m, int8 in ((r["variant"], model, None),
                              (f"{r['variant']} int8", quantize_int8(model, feedforwards=dense),
                               "every linear layer" if dense else "attention and head")):
            models[name] = m
            rows[name] = {"model": name, "variant": r["variant"], "stage": r["stage"], "int8": int8,
                          "neurons_per_token": m.ffn_neurons_per_token // m.cfg.layers,
                          "val_loss": evaluate(m, windows, train["batch_size"])}
        print(f"front: {r['variant']} loaded", flush=True)
    context = min(m.cfg.context for m in models.values())
    prompt_tokens = min(FRONT_PROMPT, context // 2)
    new_tokens = min(FRONT_NEW_TOKENS, context - prompt_tokens)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(min(m.cfg.vocab_size for m in models.values()), (1, prompt_tokens), generator=gen)
    seconds = decode_seconds(models, prompt, new_tokens, FRONT_REPEATS, gen)
    for name, t in seconds.items():
        rows[name]["tokens_per_s"] = 1.0 / t
    path.write_text(json.dumps({"rows": list(rows.values()), "threads": torch.get_num_threads(),
                                "load_average": os.getloadavg()[0], "prompt_tokens": prompt_tokens,
                                "new_tokens": new_tokens, "repeats": FRONT_REPEATS}, indent=1))
    return path


def _tuned_variant(group: str) -> str:
    """The variant whose learning rate stands for its tuning group."""
    return next(name for name in MAIN if variant_of(name)[0] == group)


def _finished_tune(root: Path, group: str) -> list[tuple[float, float]]:
    runs = [r for r in load_runs(root) if r["stage"] == "tune" and r["family"] == group]
    if not runs:
        raise FileNotFoundError(f"no finished tune runs of {group} under {root}: the first of --corpora tunes; run "
                                "the 'tune' stage there, or list the tuned corpus first (--corpora shakespeare,fortunes)")
    return [(r["metrics"]["val_loss"], r["config"]["train"]["lr"]) for r in runs]


def _args_for(args, runs: Path):
    out = argparse.Namespace(**vars(args))
    out.runs = str(runs)
    return out


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def records(root: Path, corpus: str) -> list[dict]:
    """One flat record per finished run of ``corpus``: variant, stage, seed, losses, capacity."""
    out = []
    for r in load_runs(root / corpus):
        m = r["metrics"]
        layers = r["config"]["model"]["layers"]
        best = next((h for h in m["history"] if h["step"] == m["best_step"]), m["history"][-1])
        out.append({"run": r["name"], "corpus": corpus, "stage": r["stage"], "variant": r["variant"],
                    "seed": r["seed"], "lr": r["config"]["train"]["lr"], "val_loss": m["val_loss"],
                    "test_loss": m["test_loss"], "ms_per_step": m["ms_per_step"], "steps": r["config"]["train"]["steps"],
                    "neurons_per_token": m["ffn_neurons_per_token"] // layers,
                    "training_width": m["ffn_training_width"] // layers, "capacity": best.get("capacity"),
                    "history": [{k: h[k] for k in ("step", "val_loss") if k in h}
                                | ({"dead": [c["dead"] for c in h["capacity"]]} if h.get("capacity") else {})
                                for h in m["history"]]})
    return out


def _capacity_cells(r: dict) -> tuple[str, str]:
    """(lowest deepest-level reach, highest dead fraction) over the layers of a run's selected step."""
    if not r["capacity"]:
        return "-", "-"
    return (f"{min(c['deepest_reached'] for c in r['capacity']):.2f}",
            f"{max(c['dead'] for c in r['capacity']):.2f}")


def _rows_table(rows: list[dict]) -> list[str]:
    lines = ["| variant | neurons / token | training width | lr | seeds | val loss | test loss | ms / step | "
             "deepest reached (min layer, seed 0) | dead (max layer, seed 0) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    for variant, rs in sorted(groups.items(), key=lambda kv: statistics.mean(r["val_loss"] for r in kv[1])):
        r0 = min(rs, key=lambda r: r["seed"])
        reach, dead = _capacity_cells(r0)
        lines.append(f"| {variant} | {r0['neurons_per_token']} | {r0['training_width']} | {r0['lr']:g} | {len(rs)} | "
                     f"{mean_std([r['val_loss'] for r in rs])} | {mean_std([r['test_loss'] for r in rs])} | "
                     f"{statistics.mean(r['ms_per_step'] for r in rs):.0f} | {reach} | {dead} |")
    return lines


def _mean(rows: list[dict], variant: str) -> tuple[float, float, int] | None:
    vals = [r["val_loss"] for r in rows if r["variant"] == variant]
    if not vals:
        return None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else float("nan"), len(vals)


def _is_tree(variant: str) -> bool:
    """Whether a variant is a tree (NeuronTree or FFF tuning group)."""
    return variant_of(variant)[0] in ("neuron-tree", "fff")


def _tree_rows(rows: list[dict]) -> list[dict]:
    """The rows of tree variants (NeuronTree or FFF tuning group) at <= 1/16 of the full dense neurons."""
    return [r for r in rows if _is_tree(r["variant"])
            and r["neurons_per_token"] <= FULL_DENSE // 16]


def _at_step(history: list[dict], step: float) -> float:
    """Validation loss of a run's history linearly interpolated at ``step``."""
    pts = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return pts[-1][1] if step > pts[-1][0] else pts[0][1]


def _full_dense_at_equal_time(rows: list[dict], tree: str, steps: int, step_seconds: dict) -> tuple[float, float]:
    """(steps dense-512 trains in the time ``tree`` trains ``steps``, by the interleaved step times;
    its validation loss there, read off its own runs' histories and averaged over their seeds)."""
    dense_steps = steps * step_seconds[tree] / step_seconds["dense-512"]
    losses = [_at_step(r["history"], dense_steps) for r in rows if r["variant"] == "dense-512"]
    return dense_steps, statistics.mean(losses)


def _best_tree(rows: list[dict]) -> str | None:
    """The tree variant at <= 1/16 of the full dense neurons with the lowest mean validation loss."""
    trees = {r["variant"] for r in _tree_rows(rows)}
    return min(trees, key=lambda v: _mean(rows, v)[0]) if trees else None


def _verdicts(rows: list[dict], corpus: str, step_seconds: dict | None, best: str | None) -> list[str]:
    """The control and the targets of the long regime, met or not, from the main rows; ``best`` is
    the tree picked on the first corpus (the other corpora are not tuned on)."""
    out = []
    moe, dense48, full = _mean(rows, "moe-16x32"), _mean(rows, "dense-48"), _mean(rows, "dense-512")
    if moe and dense48:
        gap = dense48[0] - moe[0]
        if moe[2] > 1 and dense48[2] > 1:
            noise = max(moe[1], dense48[1])
            verdict = (f"seed std {noise:.3f}: " +
                       ("capacity-bound" if gap > noise else "NOT capacity-bound by this control"))
        else:
            verdict = f"{moe[2]} seed(s) of MoE, {dense48[2]} of dense-48: seeds missing for a verdict"
        out.append(f"- Control ({corpus}): MoE 16x32 top-1 {moe[0]:.3f} vs dense-48 {dense48[0]:.3f}: "
                   f"{gap:+.3f} nats for MoE ({verdict}).")
    trees = _tree_rows(rows)
    if best is None or not any(r["variant"] == best for r in trees):
        return out
    tree = _mean(rows, best)
    n = next(r["neurons_per_token"] for r in trees if r["variant"] == best)
    rival = _equal_dense(rows, best)
    if rival:
        equal = _mean(rows, rival)
        gap = equal[0] - tree[0]
        out.append(f"- Best tree at <= 1/16 of the dense neurons (picked on the first corpus): {best} ({corpus}, "
                   f"{n} neurons/token, {tree[2]} "
                   f"seed(s)) {tree[0]:.3f} vs {rival} {equal[0]:.3f} ({equal[2]} seed(s)): {gap:+.3f} nats "
                   f"(target >= +0.05 over 3 seeds: {_status(gap >= 0.05, min(tree[2], equal[2]))}).")
    if full:
        ratio = tree[0] / full[0]
        out.append(f"- {best} vs dense-512 at equal tokens ({corpus}): {ratio:.3f}x (target <= 1.03x: "
                   f"{_status(ratio <= 1.03, min(tree[2], full[2]))}).")
        if step_seconds and best in step_seconds and "dense-512" in step_seconds:
            dense_steps, dense_loss = _full_dense_at_equal_time(rows, best, STEPS, step_seconds)
            ratio = tree[0] / dense_loss
            out.append(f"- {best} vs dense-512 at equal wall-clock training time ({corpus}; interleaved step times "
                       f"{1e3 * step_seconds[best]:.0f} vs {1e3 * step_seconds['dense-512']:.0f} ms, so dense-512 "
                       f"trains {dense_steps:.0f} steps in the tree's {STEPS}; its validation loss there, within its "
                       f"own {STEPS}-step schedule, {dense_loss:.3f}): {ratio:.3f}x (target <= 1.03x: "
                       f"{_status(ratio <= 1.03, min(tree[2], full[2]))}).")
    caps = [r["capacity"] for r in trees if r["variant"] == best and r["seed"] == 0 and r["capacity"]]
    if caps:
        reach = min(c["deepest_reached"] for c in caps[0])
        dead = max(c["dead"] for c in caps[0])
        out.append(f"- Capacity of {best} ({corpus}, seed 0, every layer): deepest level reached >= {reach:.2f} "
                   f"(target >= 0.50: {'met' if reach >= 0.5 else 'missed'}), dead units <= {dead:.2f} "
                   f"(target < 0.20: {'met' if dead < 0.2 else 'missed'}).")
    return out


def _control_lines(control: list[dict], main: list[dict], step_seconds: dict | None = None) -> list[str]:
    """The longer control against the main rows of its corpus: MoE vs dense-48 after
    ``CONTROL_STEPS`` (means over the control's seeds), measured against the control's own seed
    noise where it has >= 2 seeds of both, else the ``STEPS``-step main rows'; the best tree
    against the dense FFN of its neurons per token and dense-512 (at equal tokens, and with
    ``step_seconds`` at equal training time)."""
    out = []
    longer = {v: _mean(control, v) for v in {r["variant"] for r in control}}
    short = {v: _mean(main, v) for v in longer}
    for v, (loss, _, n) in sorted(longer.items(), key=lambda kv: kv[1][0]):
        if short[v]:
            out.append(f"- {v}: {mean_std([r['val_loss'] for r in control if r['variant'] == v])} after "
                       f"{CONTROL_STEPS} steps ({n} seed(s)), {short[v][0]:.3f} after {STEPS} ({short[v][2]} seed(s)): "
                       f"{loss - short[v][0]:+.3f}.")
    rivals = _at_every_lr(longer, "dense-48")
    for name, rival in ((m, d) for m in MOE_CONTROLS if m in longer for d in rivals):
        moe, dense48 = longer[name], longer[rival]
        gap, seeds = dense48[0] - moe[0], min(moe[2], dense48[2])
        if seeds > 1:                       # the control's own seed noise
            noise, at = max(moe[1], dense48[1]), CONTROL_STEPS
        else:                               # else the main rows'
            noise = max((m[1] for m in (short[name], _mean(main, "dense-48")) if m and m[2] > 1), default=None)
            at = STEPS
        verdict = ("no seed noise measured" if noise is None else f"seed std at {at} steps {noise:.3f}: " +
                   ("capacity-bound" if gap > noise else "still NOT capacity-bound by this control"))
        per_seed = " / ".join(f"{d - m:+.3f}" for m, d in _paired(control, name, rival))
        out.append(f"- Control after {CONTROL_STEPS} steps: {name} {moe[0]:.3f} vs {rival} {dense48[0]:.3f}: "
                   f"{gap:+.3f} nats for MoE ({seeds} seed(s); per seed {per_seed}; {verdict}).")
    trees = [v for v in longer if _is_tree(v)]
    best = min(trees, key=lambda v: longer[v][0]) if trees else None
    if best is None:
        return out
    tree = longer[best]
    equal = _equal_dense(control, best)
    for rival in (_at_every_lr(longer, equal) if equal else []):
        seeds = min(tree[2], longer[rival][2])
        gap = longer[rival][0] - tree[0]
        out.append(f"- {best} vs {rival} after {CONTROL_STEPS} steps: {gap:+.3f} nats for the tree (target >= +0.05: "
                   f"{_status(gap >= 0.05, seeds)}).")
    if "dense-512" in longer:
        seeds = min(tree[2], longer["dense-512"][2])
        ratio = tree[0] / longer["dense-512"][0]
        out.append(f"- {best} vs dense-512 after {CONTROL_STEPS} steps: {ratio:.3f}x (target <= 1.03x at equal tokens: "
                   f"{_status(ratio <= 1.03, seeds)}).")
        if step_seconds and best in step_seconds and "dense-512" in step_seconds:
            dense_steps, dense_loss = _full_dense_at_equal_time(control, best, CONTROL_STEPS, step_seconds)
            ratio = tree[0] / dense_loss
            out.append(f"- ... at equal training time: dense-512 trains {dense_steps:.0f} steps in the tree's "
                       f"{CONTROL_STEPS}, its validation loss there (within its own {CONTROL_STEPS}-step schedule) "
                       f"{dense_loss:.3f}: {ratio:.3f}x (target <= 1.03x: {_status(ratio <= 1.03, seeds)}).")
    return out


def _at_every_lr(variants, base: str) -> list[str]:
    """``base`` and its variants at another lr (``{base}-lr...``) among ``variants``, sorted."""
    return sorted(v for v in variants if v == base or v.startswith(f"{base}-lr"))


def _paired(rows: list[dict], a: str, b: str) -> list[tuple[float, float]]:
    """(validation loss of ``a``, of ``b``) for each seed both have, by seed."""
    loss = {(r["variant"], r.get("seed", 0)): r["val_loss"] for r in rows}
    return [(loss[a, s], loss[b, s]) for s in sorted({s for v, s in loss if v == a}) if (b, s) in loss]


def _equal_dense(rows: list[dict], variant: str) -> str | None:
    """The narrowest dense variant among ``rows`` narrower than the full dense FFN with at least the
    neurons per token of ``variant`` (its dense FFN of equal active neurons, or the next wider one
    trained): None if there is none."""
    n = next(r["neurons_per_token"] for r in rows if r["variant"] == variant)
    dense = {r["variant"]: r["neurons_per_token"] for r in rows
             if r["variant"] == f"dense-{r['neurons_per_token']}" and n <= r["neurons_per_token"] < FULL_DENSE}
    return min(dense, key=dense.get) if dense else None


def _status(met: bool, seeds: int) -> str:
    """A target's verdict, provisional while fewer than the 3 seeds it asks for are in."""
    return ("met" if met else "missed") + ("" if seeds >= 3 else f" so far, {seeds} of 3 seeds")


def pareto(rows: list[dict]) -> set[str]:
    """Names of the rows no other row beats on both validation loss (lower) and tokens/s (higher)."""
    return {r["model"] for r in rows
            if not any(o["val_loss"] <= r["val_loss"] and o["tokens_per_s"] >= r["tokens_per_s"]
                       and (o["val_loss"], o["tokens_per_s"]) != (r["val_loss"], r["tokens_per_s"]) for o in rows)}


def _front_section(front: dict, path: Path) -> list[str]:
    """The front a user picks from: table, plot and whether the trees lie on it."""
    rows = sorted(front["rows"], key=lambda r: -r["tokens_per_s"])
    on = pareto(rows)
    lines = [f"Batch-1 decoding with the KV cache after a {front['prompt_tokens']}-token prompt, "
             f"{front['new_tokens']} tokens per timed call, every model interleaved in one process (median of "
             f"{front['repeats']}; {front['threads']} thread(s), load average {front['load_average']:.2f}). "
             "int8: dynamic quantization of every linear layer (dense) or of attention and head (the others, "
             "whose feedforwards stay float); its validation loss is measured again.\n",
             "| model | neurons / token | val loss | tokens / s | on the front |", "|---|---:|---:|---:|:---:|"]
    lines += [f"| {r['model']} | {r['neurons_per_token']} | {r['val_loss']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{'yes' if r['model'] in on else ''} |" for r in rows]
    trees = [r for r in rows if _is_tree(r["variant"])]
    on_trees = [r["model"] for r in trees if r["model"] in on]
    lines += ["", f"- Trees on the front: {', '.join(on_trees) if on_trees else 'none (target missed)'}.", "",
              "![front](lm_long_front.png)"]
    _plot_front(rows, on, path)
    return lines


def _plot_front(rows: list[dict], on: set[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        tree = _is_tree(r["variant"])
        ax.scatter(r["tokens_per_s"], r["val_loss"], marker="^" if tree else "o",
                   color="tab:green" if tree else ("tab:blue" if r["variant"].startswith("dense") else "tab:orange"),
                   edgecolors="black" if r["model"] in on else "none", s=40)
        ax.annotate(r["model"], (r["tokens_per_s"], r["val_loss"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    front = sorted((r for r in rows if r["model"] in on), key=lambda r: r["tokens_per_s"])
    ax.plot([r["tokens_per_s"] for r in front], [r["val_loss"] for r in front], color="gray", lw=0.8)
    ax.set(xlabel="batch-1 decoding tokens / s (higher is better)", ylabel="validation loss (nats / char)",
           title="What a user picks from (black edge: on the front; triangles: trees)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _against_equal_dense(rows: list[dict], dense: list[dict]) -> list[str]:
    """One line per variant of ``rows``: its loss against the dense FFN of the same neurons per
    token (seed 0 of the main rows of the same corpus), where one was trained."""
    widths = {r["neurons_per_token"]: r for r in dense if r["variant"].startswith("dense-") and r["seed"] == 0}
    out = []
    for r in sorted(rows, key=lambda r: r["val_loss"]):
        d = widths.get(r["neurons_per_token"])
        if d is not None and r["variant"] != d["variant"]:
            out.append(f"- {r['variant']} ({r['neurons_per_token']} neurons/token) {r['val_loss']:.3f} vs {d['variant']} "
                       f"{d['val_loss']:.3f}: {d['val_loss'] - r['val_loss']:+.3f} nats for the conditional layer.")
    return out


def _save(fig, ax, path: Path) -> None:
    """Grid, legend, tight layout, write ``path`` and close: the end of every plot of the report."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_pruning(rows: list[dict], path: Path) -> None:
    """The auto-pruning curves: dead-unit fraction (worst layer) vs step, seed 0, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        pts = [(h["step"], max(h["dead"])) for h in r["history"] if h.get("dead")]
        if r["seed"] == 0 and pts:
            ax.plot(*zip(*pts), marker=".", label=f"{r['variant']} ({r['stage']})")
    ax.set(xlabel="training step", ylabel="dead units, worst layer (fraction)", ylim=(0, 1),
           title="Auto-pruning: units no validation token reaches")
    _save(fig, ax, path)


def _plot_curves(rows: list[dict], path: Path, title: str = "Main rows, seed 0 (solid: trees)") -> None:
    """Validation loss vs training tokens of ``rows`` (seed 0), one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tokens = BATCH * SHAPE["context"] / 1e6
    for r in sorted(rows, key=lambda r: r["val_loss"]):
        pts = [(h["step"] * tokens, h["val_loss"]) for h in r["history"] if "val_loss" in h]
        if r["seed"] == 0 and pts:
            ax.plot(*zip(*pts), label=f"{r['variant']} ({r['neurons_per_token']}/token)",
                    ls="-" if _is_tree(r["variant"]) else "--")
    ax.set(xlabel="training tokens (millions)", ylabel="validation loss (nats / char)", ylim=(None, 2.2), title=title)
    _save(fig, ax, path)


def write_report(root: Path, corpora: list[str], out: Path, command: str) -> Path:
    """``out``/lm_long.md (tables, verdicts, plots) and lm_long.json (one record per finished run)."""
    rows = [r for c in corpora if (root / c).exists() for r in records(root, c)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_long.json").write_text(json.dumps(rows, indent=1))
    text = ["# The long regime: can conditional capacity pay?\n", f"Command: `{command}`\n",
            f"{len(rows)} finished runs under `{root}`. Model: {SHAPE['layers']} layers, dim {SHAPE['dim']}, "
            f"{SHAPE['heads']} heads, context {SHAPE['context']}, batch {BATCH}; {STEPS} steps = "
            f"{STEPS * BATCH * SHAPE['context'] / 1e6:.1f}M tokens per run (tune runs: {TUNE_STEPS} steps). Losses in "
            "nats per character in eval mode (what is served), on fixed validation windows; the checkpoint with "
            "the lowest validation loss is kept and the test split is evaluated once. Capacity: fraction of the "
            "deepest level's units (leaves, deepest nodes, experts) reached and of all units never reached, on "
            "the first validation tokens (`--capacity-tokens`), at the selected step.\n"]
    def main_rows(corpus: str) -> list[dict]:
        return [r for r in rows if r["corpus"] == corpus and r["variant"] in MAIN and r["stage"] in ("main", "ablation")]

    main0 = main_rows(corpora[0])
    best = _best_tree(main0)
    steptime = root / corpora[0] / "steptime.json"
    step_seconds = json.loads(steptime.read_text())["seconds"] if steptime.exists() else None
    for corpus in corpora:
        main = main_rows(corpus)
        if main:
            _plot_curves(main, out / f"lm_long_curves_{corpus}.png")
            text += [f"## Main rows: {corpus}\n", *_rows_table(main), "", *_verdicts(main, corpus, step_seconds, best), "",
                     f"![validation loss vs tokens](lm_long_curves_{corpus}.png)", ""]
    ablations = [r for r in rows if r["stage"] == "ablation"]
    if ablations:
        text += [f"## Tree ablations ({corpora[0]}, seed 0)\n", *_rows_table(ablations), "",
                 "Against the dense FFN of equal neurons per token (seed 0):\n",
                 *_against_equal_dense(ablations + [r for r in main0 if r["seed"] == 0 and r["stage"] == "main"], main0),
                 ""]
    for corpus in corpora:
        control = [r for r in rows if r["corpus"] == corpus and r["stage"] == "control"]
        if control:
            # the first corpus keeps the plot's original name
            plot = "lm_long_curves_control.png" if corpus == corpora[0] else f"lm_long_curves_control_{corpus}.png"
            _plot_curves(control, out / plot, f"Longer control ({corpus}), {CONTROL_STEPS} steps, seed 0")
            text += [f"## Longer control ({corpus}, {CONTROL_STEPS} steps = "
                     f"{CONTROL_STEPS * BATCH * SHAPE['context'] / 1e6:.1f}M tokens; curves: seed 0)\n",
                     *_rows_table(control), "",
                     *_control_lines(control, main_rows(corpus), step_seconds), "",
                     f"![validation loss vs tokens]({plot})", ""]
    tune = [r for r in rows if r["stage"] == "tune"]
    if tune:
        text += ["## Learning-rate search\n", "| run | val loss |", "|---|---:|",
                 *(f"| {r['run']} | {r['val_loss']:.3f} |" for r in sorted(tune, key=lambda r: r["run"])), ""]
    front = root / corpora[0] / "front.json"
    if front.exists():
        text += [f"## The front ({corpora[0]}, seed 0)\n", *_front_section(json.loads(front.read_text()),
                                                                         out / "lm_long_front.png"), ""]
    curves = [r for r in rows if r["corpus"] == corpora[0] and r["stage"] in ("main", "ablation")]
    if any(h.get("dead") for r in curves for h in r["history"]):
        _plot_pruning(curves, out / "lm_long_pruning.png")
        text.append("![auto-pruning](lm_long_pruning.png)")
    md = out / "lm_long.md"
    md.write_text("\n".join(text) + "\n")
    return md
