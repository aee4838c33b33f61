"""`fastff report RUNS --out DIR`: summarise run directories (written by `fastff train` or
`fastff experiment`) into a markdown table (mean ± std over seeds) and PNG plots:
accuracy vs inference neurons, leaf-usage histograms, node entropy over epochs. A
`fastff experiment frontier` directory (holding ``frontier.json``) gets the frontier report
instead: accuracy against neurons and measured latency, each family's Pareto front, the target.

Run directories are read through the classifier trainer (``trainer.load_config``), so runs of
the earlier flat config format are converted when read; unfinished runs are left out. A run's
configuration is shown flat: the feedforward family ``ffn``, its ``width`` and options, then
the training and data fields; an option the run's family does not take, or a loss weight its
family does not record (``Family.aux_losses``), shows as "-".

Runs are grouped by their config without the seed. MA (memorisation accuracy) is the eval-mode
accuracy on the whole training split of the checkpoint selected on validation; GA
(generalisation accuracy) is that checkpoint's test accuracy (the test split is evaluated once
per run).
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..functional import fff_depth
from ..layers.families import FAMILIES, family
from ..training.run import read_json

# config fields that do not define a configuration (derived from the data, or the seed)
_NOT_KEY = {"seed", "n_features", "n_classes", "image_shape", "mean", "std"}
_ALWAYS = ("data", "ffn", "width", "leaf")
# training fields that weight an auxiliary loss: they mean something only for the families whose
# layers record that loss (``Family.aux_losses``)
_LOSS_OF = {"balance": "balance", "hardening": "hardening", "hardening_mode": "hardening",
            "hardening_warmup": "hardening"}
BASELINE = "dense"      # the family the others are measured against (FFN time ratio, the frontier's target)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", help="directory searched recursively for run directories (metrics.json)")
    p.add_argument("--out", required=True, help="output directory for <name>.md and <name>_*.png")
    p.add_argument("--name", default=None, help="report name (default: the runs directory's name)")


def run(args: argparse.Namespace) -> int:
    root = Path(args.runs)
    command = getattr(args, "command_line", f"fastff report {root} --out {args.out}")
    writer = write_frontier_report if (root / "frontier.json").exists() else write_report
    md = writer(root, Path(args.out), name=args.name or root.resolve().name, command=command)
    print(md.read_text())
    return 0


def flat_config(cfg) -> dict:
    """A run's ``TrainConfig`` as one flat dict: data, ffn, width, the family's options, then the
    other fields (an option named like a field is shown as ``ffn.<name>``)."""
    values = asdict(cfg)
    options = values.pop("ffn_options")
    head = {k: values.pop(k) for k in ("data", "ffn", "width")}
    return head | {(f"ffn.{k}" if k in values or k in head else k): v for k, v in options.items()} | values


def read_metrics(path: Path) -> dict:
    """metrics.json of a finished run, the per-evaluation records as ``history`` (runs of the
    older format call them ``epochs``)."""
    m = read_json(path)
    if "history" not in m:
        m = dict(m, history=m.get("epochs", []))
    return m


def load_runs(root: Path) -> list[dict]:
    """Every finished classifier run directory below ``root``: {"dir", "config" (``flat_config``),
    "metrics" (``read_metrics``), "timing" (or None)}. Runs of other tasks and unfinished runs
    are skipped."""
    from ..training.trainer import load_config

    runs = []
    for metrics in sorted(Path(root).rglob("metrics.json")):
        d = metrics.parent
        m = read_metrics(metrics)
        if not m.get("finished", True) or not (d / "config.json").exists():
            continue
        raw = read_json(d / "config.json")
        if raw.get("task", "classifier" if "data" in raw else None) != "classifier":      # e.g. a language model
            continue
        timing = d / "timing.json"
        runs.append({"dir": d, "config": flat_config(load_config(d)), "metrics": m,
                     "timing": read_json(timing) if timing.exists() else None})
    if not runs:
        raise FileNotFoundError(f"no finished classifier run directories (with metrics.json) under {root}")
    return runs


def _key(cfg: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in cfg.items() if k not in _NOT_KEY))


def group_runs(runs: list[dict]) -> list[list[dict]]:
    """Runs grouped by configuration (all config fields but the seed), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(_key(r["config"]), []).append(r)
    return list(groups.values())


def _ms(values) -> str:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "-"
    return f"{np.mean(v):.2f} ± {np.std(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def used_leaves(usage: list[int] | None) -> float | None:
    """Perplexity exp(H) of a leaf-usage histogram: the number of equally used leaves it is worth."""
    if not usage or sum(usage) == 0:
        return None
    p = np.asarray(usage, dtype=float) / sum(usage)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _label(cfg: dict, columns: list[str]) -> str:
    return " ".join(f"{c}={_cell(cfg, c)}" for c in columns if c != "data" and _cell(cfg, c) != "-")


def summarise(groups: list[list[dict]]) -> tuple[list[str], list[dict]]:
    """(varying config columns, one summary row per group)."""
    cfgs = [g[0]["config"] for g in groups]
    names = dict.fromkeys(k for c in cfgs for k in c)
    varying = [k for k in names if k not in _NOT_KEY and k not in _ALWAYS
               and len({json.dumps(c[k]) for c in cfgs if _applies(c, k)}) > 1]
    columns = list(_ALWAYS) + varying
    rows = []
    for g in groups:
        cfg = g[0]["config"]
        m = [r["metrics"] for r in g]
        usage = [(x["selected"].get("leaf_usage") or [None])[0] for x in m]
        row = {"config": cfg, "n": len(g), "label": _label(cfg, columns),
               "run": re.sub(r"_s\d+$", "", g[0]["dir"].name),
               "MA": [x["selected"]["train_acc"] for x in m], "val": [x["selected"]["val_acc"] for x in m],
               "GA": [x["test"]["acc"] for x in m], "neurons": m[0]["neurons_per_inference"],
               "epoch": [x["best_epoch"] for x in m], "epochs": [len(x["history"]) for x in m],
               "eval_ms": [1000 * x["test"]["eval_seconds"] for x in m],
               "used_leaves": [used_leaves(u) for u in usage], "usage": usage,
               "entropy": [[(e["node_entropy"] or [None])[0] for e in x["history"]] for x in m]}
        timing = [r["timing"] for r in g if r["timing"]]
        if timing:
            row["ffn_us"] = [t["ffn_seconds_per_token"] * 1e6 for t in timing]
        rows.append(row)
    return columns, rows


def _applies(cfg: dict, c: str) -> bool:
    """Whether column ``c`` means something for the run ``cfg`` (``flat_config``): an option its
    family takes (only those are in it), or a loss weight its family records."""
    if c not in cfg:
        return False
    return c not in _LOSS_OF or _LOSS_OF[c] in family(cfg["ffn"]).aux_losses


def _cell(cfg: dict, c: str) -> str:
    return str(cfg[c]) if _applies(cfg, c) else "-"


def markdown(columns: list[str], rows: list[dict]) -> str:
    """The summary table, one section per dataset."""
    timing = any("ffn_us" in r for r in rows)
    head = ["run"] + columns + ["seeds", "MA %", "val %", "GA %", "neurons/inference", "used leaves",
                      "best epoch / run", "test eval ms"] + (["FFN µs/token", f"FFN time vs {BASELINE}"] if timing else [])
    out = []
    for data in dict.fromkeys(r["config"]["data"] for r in rows):
        sub = [r for r in rows if r["config"]["data"] == data]
        ref = next((np.mean(r["ffn_us"]) for r in sub if r["config"]["ffn"] == BASELINE and "ffn_us" in r), None)
        out += [f"\n### {data}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sub:
            cells = [r["run"]] + [_cell(r["config"], c) for c in columns]
            cells += [str(r["n"]), _ms(r["MA"]), _ms(r["val"]), _ms(r["GA"]), str(r["neurons"]),
                      _ms(r["used_leaves"]), f"{np.mean(r['epoch']):.1f} / {np.mean(r['epochs']):.0f}",
                      _ms(r["eval_ms"])]
            if timing:
                ratio = f"{np.mean(r['ffn_us']) / ref:.2f}" if ref and "ffn_us" in r else "-"
                cells += [_ms(r.get("ffn_us", [])), ratio]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _plots(rows: list[dict], out: Path, name: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # accuracy vs inference neurons: one line per configuration family (all but the width),
    # labelled by its run name without the width tag (full configs would not fit in a legend)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        fam = f"{r['config']['data']} " + " ".join(p for p in r["label"].split() if not p.startswith("width="))
        families.setdefault(fam, []).append(r)
    for rs in families.values():
        rs = sorted(rs, key=lambda r: r["neurons"])
        ax.errorbar([r["neurons"] for r in rs], [np.mean(r["GA"]) for r in rs], yerr=[np.std(r["GA"]) for r in rs],
                    marker="o", capsize=3, label=re.sub(r"_w\d+", "", rs[0]["run"]))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden neurons evaluated per inference")
    ax.set_ylabel("test accuracy GA (%)")
    ax.set_title(f"{name}: accuracy vs inference neurons (mean ± std over seeds)")
    ax.legend(fontsize=6, ncol=1 + len(families) // 20, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    files.append(out / f"{name}_acc_vs_neurons.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    tree = [r for r in rows if r["usage"][0] is not None and len(r["usage"][0]) > 1]
    tree = sorted(tree, key=lambda r: -len(r["usage"][0]))[:9]
    if tree:
        n = len(tree)
        cols = min(3, n)
        fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 2.6 * math.ceil(n / cols)),
                                 squeeze=False)
        for ax, r in zip(axes.flat, tree):
            u = np.asarray(r["usage"][0], dtype=float)
            ax.bar(range(len(u)), u / u.sum())
            ax.set_title(f"{r['run']}\nused leaves {_ms(r['used_leaves'])}", fontsize=8)
            ax.set_xlabel("leaf (seed 0)", fontsize=7)
            ax.set_ylabel("fraction of train rows", fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        files.append(out / f"{name}_leaf_usage.png")
        fig.tight_layout()
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in tree:
            length = min(len(e) for e in r["entropy"])
            curves = np.array([[np.nan if v is None else v for v in e[:length]] for e in r["entropy"]], dtype=float)
            ax.plot(range(1, length + 1), np.nanmean(curves, 0), marker=".", label=r["run"])
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean node-decision entropy (nats)")
        ax.set_title(f"{name}: node entropy over epochs (train probe, mean over seeds)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        files.append(out / f"{name}_entropy.png")
        fig.tight_layout()
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def write_report(root: Path, out: Path, name: str, command: str) -> Path:
    """Write ``out/<name>.md`` and ``out/<name>_*.png`` for the runs under ``root``; returns the md path."""
    runs = load_runs(root)
    columns, rows = summarise(group_runs(runs))
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(rows, out, name)
    text = [f"# {name}\n", f"Command: `{command}`\n",
            f"{len(runs)} runs under `{root}`, {len(rows)} configurations; mean ± std over seeds. "
            "MA = eval-mode accuracy on the whole training split and GA = test accuracy, both of the "
            "checkpoint selected on the validation split (the test split is evaluated once per run). "
            "'used leaves' = exp(entropy) of the hard leaf-usage histogram on 10k training rows.\n",
            markdown(columns, rows), ""]
    text += [f"![{p.stem}]({p.name})" for p in plots]
    md = out / f"{name}.md"
    md.write_text("\n".join(text) + "\n")
    return md


COSTS = {"neurons": "neurons per inference", "b1_1": "batch 1, 1 thread (µs)", "b1_2": "batch 1, 2 threads (µs)",
         "bN_1": "batch {N}, 1 thread (ms)", "bN_2": "batch {N}, 2 threads (ms)"}


def tree_family(name: str) -> bool:
    """Whether the family ``name`` is a tree: sized by its depth (``Family.sized``)."""
    return family(name).sized is not None


def _colour(name: str) -> str:
    """The plot colour of a family: matplotlib's cycle in registry order."""
    return f"C{list(FAMILIES).index(family(name).name) % 10}"


def _options(c: dict) -> dict:
    """The family options of a ``flat_config``."""
    keys = {o.name: f"ffn.{o.name}" if f"ffn.{o.name}" in c else o.name for o in family(c["ffn"]).options}
    return {name: c[key] for name, key in keys.items() if key in c}


def _shape(row: dict) -> str:
    """Readable config of a frontier row: the family's layer and its shape, e.g. ``FFF w=1024 l=8
    (d7)``, ``NeuronTree 2x6`` (trees x depth), ``MoE 8x16 top-1``, ``DenseFF w=16``; depths from
    the family's geometry."""
    c = row["config"]
    fam = family(c["ffn"])
    options = _options(c)
    if fam.name == "fff":
        shape = f"w={c['width']} l={options['leaf']} (d{fff_depth(c['width'] // options['leaf'])})"
    elif fam.name == "neuron-tree":
        trees = options["trees"]
        shape = f"{trees}x{fam.geometry(c['width'], options).neurons_per_token // trees - 1}"
    elif fam.name == "moe":
        shape = f"{c['width'] // options['leaf']}x{options['leaf']} top-{options['top_k']}"
    else:
        shape = f"w={c['width']}"
    tokens = row["run"].partition(f"_{fam.name}_")[2].split("_")[:-1]       # shape tokens, variant; no recipe
    variant = "_".join(t for t in tokens if not re.fullmatch(r"[a-z]\d+", t))
    return f"{fam.layer.__name__} {shape}" + (f" + {variant}" if variant else "")


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, value) no other point dominates (cost <= and value >=, one strictly)."""
    return [i for i, (c, v) in enumerate(points)
            if not any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for c2, v2 in points)]


def frontier_rows(root: Path) -> tuple[dict, list[dict]]:
    """(frontier.json, one summary row per grid configuration with "family" (its name in
    ``FAMILIES``), "shape", "recipe", "cost" {neurons, b1_1, b1_2, bN_1, bN_2} and "front" {cost:
    on its family's validation front})."""
    meta = read_json(Path(root) / "frontier.json")
    runs = [r for r in load_runs(root) if re.sub(r"_s\d+$", "", r["dir"].name) in meta["grid"]]
    _, rows = summarise(group_runs(runs))
    for r in rows:
        r["family"] = family(r["config"]["ffn"]).name
        r["shape"], r["recipe"] = _shape(r), r["run"].rsplit("_", 1)[1]
        lat = meta["latency"].get(r["config"]["data"], {})
        r["cost"] = {"neurons": r["neurons"]}
        for key, scale in (("b1", 1e6), ("bN", 1e3)):
            for t, times in lat.get(key, {}).items():
                if r["run"] in times:
                    r["cost"][f"{key}_{t}"] = scale * times[r["run"]]
        r["front"] = {}
    for data in {r["config"]["data"] for r in rows}:
        for name in FAMILIES:
            sub = [r for r in rows if r["config"]["data"] == data and r["family"] == name]
            for cost in COSTS:
                have = [r for r in sub if cost in r["cost"]]
                for i in pareto([(r["cost"][cost], np.mean(r["val"])) for r in have]):
                    have[i]["front"][cost] = True
    return meta, rows


TARGET_CHECKS = {"neurons": "no more neurons per inference", "b1_1": "no slower at batch 1 (1 thread)",
                 "either": "no more neurons or no slower at batch 1: the target's check"}


def best_cheaper(tree: dict, dense: list[dict], cost: str) -> tuple[list[dict], dict | None, float]:
    """The dense rows no costlier than ``tree`` in ``cost`` (a ``COSTS`` key, or "either": neurons or
    b1_1), the most accurate of them (mean GA) and the GA gap tree − it (inf if there is none)."""
    def no_costlier(r, c):
        return r["cost"].get(c, float("inf")) <= tree["cost"].get(c, float("inf"))

    rivals = [r for r in dense if (no_costlier(r, "neurons") or no_costlier(r, "b1_1") if cost == "either"
                                   else no_costlier(r, cost))]
    top = max(rivals, key=lambda r: np.mean(r["GA"]), default=None)
    return rivals, top, (np.mean(tree["GA"]) - np.mean(top["GA"]) if top else float("inf"))


def frontier_target(rows: list[dict], max_neurons: int = 16, margin: float = 1.0) -> dict | None:
    """The best tree (``tree_family``; by mean validation accuracy) with at most ``max_neurons``
    neurons per inference against the dense FFs (``BASELINE``) no costlier than it
    (``TARGET_CHECKS``; the target is "either": it must beat all of those). GA means; ``met`` =
    ``margin`` reached."""
    trees = [r for r in rows if tree_family(r["family"]) and r["neurons"] <= max_neurons]
    if not trees:
        return None
    best = max(trees, key=lambda r: np.mean(r["val"]))
    dense = [r for r in rows if r["family"] == BASELINE]
    out = {"tree": best, "margin": margin}
    for k in TARGET_CHECKS:
        rivals, top, gap = best_cheaper(best, dense, k)
        out[k] = {"rivals": rivals, "best": top, "gap": gap, "met": gap >= margin}
    return out


def _frontier_plot(rows: list[dict], path: Path, title: str, batch: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (cost, label) in zip(axes.flat, COSTS.items()):
        for name in FAMILIES:
            colour = _colour(name)
            sub = sorted((r for r in rows if r["family"] == name and cost in r["cost"]), key=lambda r: r["cost"][cost])
            if not sub:
                continue
            ax.errorbar([r["cost"][cost] for r in sub], [np.mean(r["GA"]) for r in sub],
                        yerr=[np.std(r["GA"]) for r in sub], fmt="o", ms=4, alpha=0.45, capsize=2,
                        color=colour)
            front = [r for r in sub if r["front"].get(cost)]
            ax.plot([r["cost"][cost] for r in front], [np.mean(r["GA"]) for r in front], "-o", ms=5,
                    drawstyle="steps-post", color=colour, label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label.format(N=batch))
        ax.set_ylabel("test accuracy GA (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    axes.flat[-1].axis("off")
    axes.flat[-1].text(0, 0.5, "dots: every configuration (mean ± std over seeds)\n"
                       "lines: each family's Pareto front,\nchosen on mean validation accuracy,\n"
                       "drawn at the test accuracy", fontsize=10, va="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_frontier_report(root: Path, out: Path, name: str, command: str) -> Path:
    """``out/<name>.md`` and ``out/<name>_<data>.png`` for a ``fastff experiment frontier`` run
    directory (its ``frontier.json`` and runs); returns the md path."""
    meta, rows = frontier_rows(root)
    out.mkdir(parents=True, exist_ok=True)
    text = [f"# {name}\n", f"Command: `{command}`\n",
            "Mean ± std over seeds; GA = test accuracy of the checkpoint selected on validation (test evaluated "
            "once per run); 'used leaves' = exp(entropy) of the hard leaf-usage histogram. Latency: eval forward "
            "of the first seed's model under `torch.inference_mode()`, fastff's default backend, median of "
            "interleaved calls (one `median_times` call per column, each timed call right after an untimed one "
            "of the same model). 'front' = on its family's Pareto front of mean validation accuracy against "
            "neurons / b1 / bN latency (1 thread).\n"]
    for data in dict.fromkeys(r["config"]["data"] for r in rows):
        sub = sorted((r for r in rows if r["config"]["data"] == data),
                     key=lambda r: (list(FAMILIES).index(r["family"]), r["neurons"]))
        lat = meta["latency"].get(data, {})
        batch = lat.get("batch", 0)
        recipes = meta["recipes"].get(data, {})
        text += [f"\n## {data}\n", "Recipes (validation accuracy % of each family's representative config, "
                 "first seed; the best is used for the whole family):\n",
                 "| family | " + " | ".join(next(iter(recipes.values()))["val"]) + " | picked |",
                 "|---|" + "---|" * (len(next(iter(recipes.values()))["val"]) + 1)]
        text += [f"| {fam} | " + " | ".join(f"{v:.2f}" for v in e["val"].values()) + f" | {e['picked']} |"
                 for fam, e in recipes.items()]
        tried = [v for v in meta["variants"] if v["data"] == data]
        if tried:
            text += ["", "Tree variants (first seed; kept = validation accuracy above every plain tree with no more "
                     "neurons):", "", "| run | neurons | val % | best plain tree val % | kept |", "|---|---|---|---|---|"]
            text += [f"| {v['run']} | {v['neurons']} | {v['val']:.2f} | {v['front_val']:.2f} | "
                     f"{'yes' if v['kept'] else 'no'} |" for v in tried]
        if lat:
            text += ["", f"Load average (1, 5, 15 min) before timing: {', '.join(f'{x:.2f}' for x in lat['loadavg_before'])}; "
                     f"after: {', '.join(f'{x:.2f}' for x in lat['loadavg_after'])}. Batch 1: {lat['repeats']} timed "
                     f"calls per model, batch {batch}: {max(5, lat['repeats'] // 10)}."]
        head = ["family", "config", "recipe", "seeds", "neurons/inference", "val %", "GA %", "MA %", "used leaves",
                "b1 1t µs", "b1 2t µs", f"b{batch} 1t ms", f"b{batch} 2t ms", "front (neurons / b1 / bN)"]
        text += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sub:
            cost = ["-" if k not in r["cost"] else f"{r['cost'][k]:.{1 if k.startswith('b1') else 2}f}"
                    for k in ("b1_1", "b1_2", "bN_1", "bN_2")]
            front = " / ".join("✓" if r["front"].get(k) else "·" for k in ("neurons", "b1_1", "bN_1"))
            text.append("| " + " | ".join([r["family"], r["shape"], r["recipe"], str(r["n"]), str(r["neurons"]),
                                            _ms(r["val"]), _ms(r["GA"]), _ms(r["MA"]), _ms(r["used_leaves"]),
                                            *cost, front]) + " |")
        dense = [r for r in sub if r["family"] == BASELINE]
        gaps = [k for k in COSTS if any(k in r["cost"] for r in dense)]
        text += ["", "Each tree against the most accurate dense FF no costlier than it in one measure (GA gap, "
                 "tree − that FF; positive = the tree wins):", "",
                 "| tree | neurons | GA % | " + " | ".join(f"vs dense ≤ {COSTS[k].format(N=batch)}" for k in gaps) + " |",
                 "|" + "---|" * (3 + len(gaps))]
        trees = [r for r in sub if tree_family(r["family"])]
        wins = {k: [best_cheaper(r, dense, k)[2] for r in trees] for k in gaps}
        for i, r in enumerate(trees):
            cells = []
            for k in gaps:
                top = best_cheaper(r, dense, k)[1]
                cells.append(f"{wins[k][i]:+.2f} ({top['shape']})" if top else "no dense FF is as cheap")
            text.append(f"| {r['shape']} | {r['neurons']} | {_ms(r['GA'])} | " + " | ".join(cells) + " |")
        if trees:
            def tally(gaps_k: list[float]) -> str:
                met = [g for g in gaps_k if g < float("inf")]
                words = f"{sum(g > 0 for g in met)} of {len(met)} ahead"
                words += f" (largest lead {max(met):+.2f})" if met else ""
                unmatched = len(gaps_k) - len(met)
                return words + (f", {unmatched} with no dense FF as cheap" if unmatched else "")
            text += ["", "Trees against the best dense FF no costlier than them: "
                     + "; ".join(f"{COSTS[k].format(N=batch)}: {tally(wins[k])}" for k in gaps) + "."]
        target = frontier_target(sub)
        if target:
            t = target["tree"]
            text += ["", f"Target (at ≤ 16 neurons per inference the best tree, picked on validation, beats every "
                     f"dense FF no costlier than it by ≥ {target['margin']:g} GA point): best tree "
                     f"**{t['shape']}** ({t['neurons']} neurons, b1 {t['cost'].get('b1_1', float('nan')):.1f} µs, "
                     f"GA {_ms(t['GA'])}, val {_ms(t['val'])})."]
            for k, words in TARGET_CHECKS.items():
                s = target[k]
                rival = (f"the best of them, {s['best']['shape']} ({s['best']['neurons']} neurons, b1 "
                         f"{s['best']['cost'].get('b1_1', float('nan')):.1f} µs), has GA {_ms(s['best']['GA'])}: "
                         f"gap {s['gap']:+.2f} — **{'met' if s['met'] else 'missed'}**") if s["best"] \
                    else "none exists, so this check says nothing"
                text.append(f"- dense FFs {words}: {len(s['rivals'])}; {rival}.")
        png = out / f"{name}_{Path(data).name}.png"
        _frontier_plot(sub, png, f"{data}: accuracy vs inference cost", batch)
        text += ["", f"![{png.stem}]({png.name})"]
    md = out / f"{name}.md"
    md.write_text("\n".join(text) + "\n")
    return md
