"""`fastff report RUNS --out DIR`: summarise run directories (written by `fastff train` or
`fastff experiment`) into a markdown table (mean ± std over seeds) and PNG plots:
accuracy vs inference neurons, leaf-usage histograms, node entropy over epochs.

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
import shlex
import sys
from pathlib import Path

import numpy as np

# config fields that do not define a configuration (derived from the data, or the seed)
_NOT_KEY = {"seed", "n_features", "n_classes", "image_shape", "mean", "std"}
_ALWAYS = ("data", "model", "width", "leaf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", help="directory searched recursively for run directories (metrics.json)")
    p.add_argument("--out", required=True, help="output directory for <name>.md and <name>_*.png")
    p.add_argument("--name", default=None, help="report name (default: the runs directory's name)")


def run(args: argparse.Namespace) -> int:
    root = Path(args.runs)
    command = "fastff report " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("report") + 1:]) \
        if "report" in sys.argv else f"fastff report {root} --out {args.out}"
    md = write_report(root, Path(args.out), name=args.name or root.resolve().name, command=command)
    print(md.read_text())
    return 0


def load_runs(root: Path) -> list[dict]:
    """Every run directory below ``root``: {"dir", "config", "metrics", "timing" (or None)}."""
    runs = []
    for metrics in sorted(Path(root).rglob("metrics.json")):
        d = metrics.parent
        timing = d / "timing.json"
        runs.append({"dir": d, "config": json.loads((d / "config.json").read_text()),
                     "metrics": json.loads(metrics.read_text()),
                     "timing": json.loads(timing.read_text()) if timing.exists() else None})
    if not runs:
        raise FileNotFoundError(f"no run directories (with metrics.json) under {root}")
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
    varying = [k for k in cfgs[0] if k not in _NOT_KEY and k not in _ALWAYS
               and len({json.dumps(c.get(k)) for c in cfgs}) > 1]
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
               "epoch": [x["best_epoch"] for x in m], "epochs": [len(x["epochs"]) for x in m],
               "eval_ms": [1000 * x["test"]["eval_seconds"] for x in m],
               "used_leaves": [used_leaves(u) for u in usage], "usage": usage,
               "entropy": [[(e["node_entropy"] or [None])[0] for e in x["epochs"]] for x in m]}
        timing = [r["timing"] for r in g if r["timing"]]
        if timing:
            row["ffn_us"] = [t["ffn_seconds_per_token"] * 1e6 for t in timing]
        rows.append(row)
    return columns, rows


# options that only mean something for some models (shown as "-" elsewhere)
_ONLY_FOR = {"leaf": ("fff", "moe"), "top_k": ("moe",), "trees": ("neuron-tree",), "balance": ("fff", "moe"),
             **{k: ("fff",) for k in ("region_leak", "master_leaf", "train_mode", "hardening", "hardening_mode",
                                     "hardening_warmup")}}


def _cell(cfg: dict, c: str) -> str:
    if cfg["model"] not in _ONLY_FOR.get(c, (cfg["model"],)):
        return "-"
    return str(cfg.get(c))


def markdown(columns: list[str], rows: list[dict]) -> str:
    """The summary table, one section per dataset."""
    timing = any("ffn_us" in r for r in rows)
    head = ["run"] + columns + ["seeds", "MA %", "val %", "GA %", "neurons/inference", "used leaves",
                      "best epoch / run", "test eval ms"] + (["FFN µs/token", "FFN time vs ff"] if timing else [])
    out = []
    for data in dict.fromkeys(r["config"]["data"] for r in rows):
        sub = [r for r in rows if r["config"]["data"] == data]
        ref = next((np.mean(r["ffn_us"]) for r in sub if r["config"]["model"] == "ff" and "ffn_us" in r), None)
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
