"""`fastff experiment table1|ablation|moe|vit|recipe`: run a whole grid of `fastff train` runs, then its
report. Runs go to ``<runs>/<experiment>/<name>_s<seed>/``; a finished run is skipped and an
interrupted one continues from its checkpoint, so an interrupted grid resumes where it stopped.
Each process uses one torch thread (``--threads``) so several grids can share the machine.

A grid entry is one flat dict: ``ffn`` (the feedforward family), ``TrainConfig`` fields and the
family's options (``leaf``, ``master_leaf``, ...), which ``make_config`` moves into ``ffn_options``.

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
- frontier: FashionMNIST 20 epochs (MNIST-5k: ``--datasets fashion-mnist,mnist5k``, 40 epochs), 3
            seeds: dense FF widths 4..128, FFF widths 128/512/1024 x leaf 4/8/16, NeuronTrees,
            MoE top-1 (``FRONTIER_GRID``), each family under the recipe its representative config
            (``FRONTIER_SEARCH``) does best with on validation among ``FRONTIER_RECIPES`` (seed 0);
            the tree variants ``FRONTIER_VARIANTS`` are tried on seed 0 and join the grid when their
            validation accuracy moves the trees' validation front. Then the seed-0 model of every
            configuration is timed (batch 1 and ``--latency-batch`` rows, 1 and 2 threads, one
            interleaved ``median_times`` call per setting) and ``frontier.json`` + the report written.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..data import Dataset
from ..layers import families
from ..models.vit import TinyViT
from ..threads import set_threads
from ..training.run import read_json
from ..training.trainer import TrainConfig
from .timing import median_times

EXPERIMENTS = ("table1", "ablation", "moe", "vit", "recipe", "frontier")
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

# `frontier`: every family trains under the candidate recipe its representative configuration
# (FRONTIER_SEARCH, seed 0) reaches the best validation accuracy with.
FRONTIER_EPOCHS = 20
FRONTIER_RECIPES = {"sgd": dict(lr=0.2, schedule="cosine"),
                    "momentum": dict(lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
                    "adam": dict(optimizer="adam", lr=1e-3, schedule="cosine")}
# keyed by family name (``fastff.layers.FAMILIES``): the family's fixed settings
FRONTIER_FAMILIES = {"dense": {},
                     "fff": dict(hardening=3.0),                  # h ramped in over the first third
                     "neuron-tree": dict(activation="gelu"),      # UltraFastBERT's GELU
                     "moe": dict(balance=0.01)}                   # Switch's load-balancing alpha
FRONTIER_SEARCH = {"dense": dict(width=16), "fff": dict(width=128, leaf=8), "neuron-tree": dict(width=1023),
                   "moe": dict(width=128, leaf=16)}
# dense widths: 4..128 plus every neuron count a tree of the grid or the variants uses at <= 16,
# so each tree meets the dense FF of exactly its inference neurons
FRONTIER_GRID = {"dense": [dict(width=w) for w in (4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 32, 64, 128)],
                 "fff": [dict(width=w, leaf=leaf) for w in (128, 512, 1024) for leaf in (4, 8, 16)],
                 "neuron-tree": [dict(width=127), dict(width=1023), dict(width=4095), dict(width=16383),
                                 dict(width=254, trees=2), dict(width=252, trees=4)],
                 "moe": [dict(width=w, leaf=leaf) for w in (128, 512, 1024) for leaf in (8, 16)]}
# Tree improvements, tried on the first seed: (config of the "fff" family, variant name, options):
# routing-aware initialisation (every node a balanced principal-direction split), load balancing
# from the first step, a master leaf, a larger training width at the same inference cost trained
# in O(depth) (hard_path, 16 neurons per inference), and shallower trees with wider leaves (no
# variant name: plain FFFs outside the grid's widths).
FRONTIER_VARIANTS = [(dict(width=96, leaf=12), "", {}), (dict(width=56, leaf=14), "", {}),
                     (dict(width=128, leaf=8), "pca", dict(routing_init="pca")),
                     (dict(width=128, leaf=4), "master", dict(master_leaf="scalar")),
                     (dict(width=512, leaf=4), "master", dict(master_leaf="scalar")),
                     (dict(width=2048, leaf=8), "hardpath-balance", dict(train_mode="hard_path", balance=0.1)),
                     (dict(width=2048, leaf=8), "pca-hardpath-balance",
                      dict(routing_init="pca", train_mode="hard_path", balance=0.1))]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per configuration (default 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed .. first-seed+seeds-1 (to split a grid over processes)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: per experiment)")
    p.add_argument("--epochs-fashion", type=int, default=10, help="table1: FashionMNIST epochs (default 10)")
    p.add_argument("--epochs-mnist", type=int, default=40, help="table1, frontier: MNIST-5k epochs (default 40)")
    p.add_argument("--datasets", default=None,
                   help="table1, frontier: comma-separated datasets (default: table1 fashion-mnist,mnist5k; "
                        "frontier fashion-mnist)")
    p.add_argument("--widths", default="16,32,64,128", help="table1: training widths")
    p.add_argument("--leaves", default="1,2,4,8", help="table1: FFF leaf widths")
    p.add_argument("--limit", type=int, default=None, help="training rows per run (vit default 5000; 0 = all)")
    p.add_argument("--only", default=None,
                   help="comma-separated substrings: train only runs whose name contains one (report covers all)")
    p.add_argument("--skip", default=None,
                   help="comma-separated substrings: do not train runs whose name contains one (report covers all)")
    p.add_argument("--runs", default="runs", help="parent directory of the run directories")
    p.add_argument("--results", default="docs/results", help="where the report goes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--latency-batch", type=int, default=4096,
                   help="frontier: the large batch (validation rows) timed besides batch 1 (default 4096)")
    p.add_argument("--latency-repeats", type=int, default=300,
                   help="frontier: timed calls per model at batch 1 (a tenth, at least 5, at the large batch)")
    p.add_argument("--no-report", action="store_true", help="only train")
    p.add_argument("--quiet", action="store_true")


def _data_tag(data: str) -> str:
    """Run-name tag of a dataset: its builtin name, or the file / directory name of a user path."""
    return Path(data).name


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


_CONFIG_FIELDS = set(TrainConfig.__dataclass_fields__) - {"ffn_options"}


def make_config(values: dict) -> TrainConfig:
    """The validated TrainConfig of a flat grid entry: ``TrainConfig`` fields stay, every other
    name is an option of the family ``values["ffn"]`` (an unknown one is an error naming the
    options that family takes)."""
    options = {k: v for k, v in values.items() if k not in _CONFIG_FIELDS}
    fields = {k: v for k, v in values.items() if k in _CONFIG_FIELDS}
    return TrainConfig(**fields, ffn_options=options).validate()


def grid(args: argparse.Namespace) -> list[tuple[str, TrainConfig]]:
    """(run name, config) for every run of the experiment, seeds innermost-last."""
    runs: list[tuple[str, dict]] = []
    if args.name == "table1":
        for data in (args.datasets or "fashion-mnist,mnist5k").split(","):
            epochs = args.epochs or (args.epochs_fashion if data == "fashion-mnist" else args.epochs_mnist)
            tag = _data_tag(data)
            for w in _ints(args.widths):
                runs.append((f"{tag}_ff_w{w}", dict(data=data, ffn="dense", width=w, epochs=epochs)))
                for leaf in _ints(args.leaves):
                    if leaf <= w:
                        runs.append((f"{tag}_fff_w{w}_l{leaf}",
                                     dict(data=data, ffn="fff", width=w, leaf=leaf, epochs=epochs)))
    elif args.name == "ablation":
        base = dict(data="fashion-mnist", ffn="fff", width=128, leaf=8, epochs=args.epochs or 10)
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
        runs = [("moe_ff", base | dict(ffn="dense")),
                ("moe_moe_e16_k1", base | dict(ffn="moe", leaf=16, top_k=1)),
                ("moe_moe_e16_k2", base | dict(ffn="moe", leaf=16, top_k=2)),
                ("moe_fff_l16", base | dict(ffn="fff", leaf=16))]   # FFF l=8 at w=128: see ablation
    elif args.name == "recipe":
        epochs = args.epochs or RECIPE["epochs"]     # a shorter run keeps its h ramp within the run
        data = dict(data="fashion-mnist", width=128)
        base = data | RECIPE | dict(epochs=epochs, hardening_warmup=min(RECIPE["hardening_warmup"], epochs))
        runs = [("recipe_ff", base | dict(ffn="dense")),
                ("recipe_ff-momentum", data | FF_RECIPE | dict(ffn="dense", epochs=epochs))]
        runs += [(f"recipe_{k}", base | dict(ffn="fff", leaf=8) | v) for k, v in RECIPE_VARIANTS.items()]
    elif args.name == "vit":
        limit = 5000 if args.limit is None else args.limit
        base = dict(data="fashion-mnist", arch="vit", width=128, epochs=args.epochs or 3, limit=limit or None,
                    activation="gelu", lr=0.05, momentum=0.9, hardening=0.5, hardening_mode="reach")
        runs = [("vit_ff", base | dict(ffn="dense")),
                ("vit_fff_l1_d7", base | dict(ffn="fff", leaf=1)),
                ("vit_fff_l8_d4", base | dict(ffn="fff", leaf=8))]
    else:
        raise ValueError(f"{args.name!r} is trained in stages: see frontier_search, frontier_grid, frontier_variants")
    if args.limit is not None and args.name != "vit":
        runs = [(n, c | dict(limit=args.limit or None)) for n, c in runs]
    return [(f"{name}_s{seed}", make_config(cfg | dict(seed=seed)))
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


def _frontier_run(args, data: str, family: str, recipe: str, c: dict, seed: int, variant: str = "",
                  options: dict | None = None) -> tuple[str, TrainConfig]:
    """(run name, config) of one frontier run: family settings, recipe, config ``c``, variant
    options. The name tags the width and every other entry of ``c`` by its initial (``_l8``, ``_t2``)."""
    epochs = args.epochs or (FRONTIER_EPOCHS if data == "fashion-mnist" else args.epochs_mnist)
    ramp = dict(hardening_warmup=round(epochs / 3)) if "hardening" in families.family(family).aux_losses else {}
    cfg = (dict(data=data, ffn=family, epochs=epochs) | FRONTIER_FAMILIES[family] | ramp | FRONTIER_RECIPES[recipe]
           | c | (options or {}))
    if args.limit is not None:
        cfg["limit"] = args.limit or None
    shape = f"w{c['width']}" + "".join(f"_{k[0]}{v}" for k, v in c.items() if k != "width")
    name = f"frontier_{_data_tag(data)}_{family}_{shape}{'_' + variant if variant else ''}_{recipe}_s{seed}"
    return name, make_config(cfg | dict(seed=seed))


def _frontier_datasets(args) -> list[str]:
    return (args.datasets or "fashion-mnist").split(",")


def frontier_search(args) -> list[tuple[str, TrainConfig]]:
    """Seed-``first_seed`` runs of every family's representative config under every candidate recipe."""
    return [_frontier_run(args, data, family, recipe, FRONTIER_SEARCH[family], args.first_seed)
            for data in _frontier_datasets(args) for family in FRONTIER_FAMILIES for recipe in FRONTIER_RECIPES]


def frontier_grid(args, recipes: dict) -> list[tuple[str, TrainConfig]]:
    """Every ``FRONTIER_GRID`` config and seed under its family's picked recipe (``pick_recipes``)."""
    return [_frontier_run(args, data, family, recipes[data][family]["picked"], c, seed)
            for data in _frontier_datasets(args) for family, configs in FRONTIER_GRID.items() for c in configs
            for seed in range(args.first_seed, args.first_seed + args.seeds)]


def frontier_variants(args, recipes: dict, seeds=None) -> list[tuple[str, TrainConfig]]:
    """The ``FRONTIER_VARIANTS`` runs (fff family recipe) for ``seeds`` (default: the first seed only)."""
    seeds = [args.first_seed] if seeds is None else seeds
    return [_frontier_run(args, data, "fff", recipes[data]["fff"]["picked"], base, seed, variant, options)
            for data in _frontier_datasets(args) for base, variant, options in FRONTIER_VARIANTS for seed in seeds]


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (runs of the older format: metrics.json is written at the end)."""
    path = Path(run_dir) / "metrics.json"
    return path.exists() and bool(read_json(path).get("finished", True))


def _selected(root: Path, name: str) -> dict:
    m = read_json(root / name / "metrics.json")
    return {"val": m["selected"]["val_acc"], "neurons": m["neurons_per_inference"]}


def pick_recipes(root: Path, search: list[tuple[str, TrainConfig]]) -> dict:
    """{data: {family: {"picked": recipe, "val": {recipe: validation accuracy}}}} from the search
    runs: each family's recipe is the one with the best validation accuracy (first on ties)."""
    out: dict = {}
    for name, cfg in search:
        family = cfg.ffn
        recipe = name.rsplit("_", 2)[-2]
        entry = out.setdefault(cfg.data, {}).setdefault(family, {"val": {}})
        entry["val"][recipe] = _selected(root, name)["val"]
    for families in out.values():
        for entry in families.values():
            entry["picked"] = max(entry["val"], key=lambda r: (entry["val"][r], -list(entry["val"]).index(r)))
    return out


def kept_variants(root: Path, grid: list[tuple[str, TrainConfig]], tried: list[tuple[str, TrainConfig]]) -> list[dict]:
    """Judge every tried variant (first-seed run) against the plain trees of its data: it is kept if its
    validation accuracy beats every plain FFF / NeuronTree first-seed run with no more neurons per
    inference (it moves the trees' validation front). Trees: the families sized by depth
    (``report.tree_family``). Returns one record per variant."""
    from .report import tree_family

    first = {}
    for name, cfg in grid:
        first.setdefault(name.rsplit("_s", 1)[0], (name, cfg))
    plain = [(cfg.data, _selected(root, name)) for name, cfg in first.values()
             if tree_family(cfg.ffn) and finished(root / name)]
    records = []
    for name, cfg in tried:
        if not finished(root / name):
            continue
        got = _selected(root, name)
        front = max((p["val"] for data, p in plain if data == cfg.data and p["neurons"] <= got["neurons"]), default=0.0)
        records.append({"run": name.rsplit("_s", 1)[0], "data": cfg.data, **got, "front_val": front,
                        "kept": got["val"] > front})
    return records


@torch.inference_mode()
def frontier_latency(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int,
                     threads=(1, 2)) -> dict:
    """Eval latency of every model (seconds, median): {"b1" / "bN": {threads: {name: s}}}, at batch 1
    (the first row of x) and batch len(x) (a tenth of the repeats, at least 5), each setting one
    interleaved ``median_times`` call (each timed call right after an untimed one of the same
    model). Also the machine's load average before and after. x (N, features)."""
    out = {"batch": len(x), "repeats": repeats, "loadavg_before": os.getloadavg(), "b1": {}, "bN": {}}
    before = torch.get_num_threads()
    try:
        for t in threads:
            set_threads(t)
            for key, xb, reps in (("b1", x[:1], repeats), ("bN", x, max(5, repeats // 10))):
                out[key][t] = median_times({n: (lambda m=m, xb=xb: m(xb)) for n, m in models.items()}, reps,
                                           rewarm=True)
    finally:
        set_threads(before)
    out["loadavg_after"] = os.getloadavg()
    return out


def _train(root: Path, todo: list[tuple[str, TrainConfig]], args) -> None:
    """Train every run of ``todo`` that has not finished (each split loaded once): an interrupted
    run continues from its checkpoint, one without a checkpoint starts again. A ViT run also
    gets its ``timing.json``."""
    from ..data import load_dataset
    from ..training.trainer import fit, load_run

    todo = sorted(todo, key=lambda item: (item[1].data, item[1].seed, item[1].limit or 0))
    cache: dict = {}

    def data_of(cfg: TrainConfig) -> Dataset:
        key = (cfg.data, cfg.seed, cfg.limit)
        if key not in cache:
            cache.clear()
            cache[key] = load_dataset(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, limit=cfg.limit)
        return cache[key]

    for i, (name, cfg) in enumerate(todo, 1):
        out = root / name
        if finished(out):
            if cfg.arch == "vit" and not (out / "timing.json").exists():
                save_ffn_timing(out, load_run(out)[0], data_of(cfg))
            continue
        mode = "resume" if (out / "checkpoint.pt").exists() else "overwrite"
        model, result = fit(cfg, data_of(cfg), out, mode, progress=not args.quiet)
        if cfg.arch == "vit":
            save_ffn_timing(out, model, data_of(cfg))
        print(f"[{i}/{len(todo)}] {name}: GA {result.test['acc']:.2f}  MA {result.train_acc:.2f}  "
              f"({result.training_seconds:.0f}s)", flush=True)


def _wanted(todo: list[tuple[str, TrainConfig]], args) -> list[tuple[str, TrainConfig]]:
    """The runs of ``todo`` that ``--only`` selects and ``--skip`` does not drop."""
    def matches(name: str, parts: str | None) -> bool:
        return any(part in name for part in parts.split(",") if part)

    return [(n, c) for n, c in todo if (not args.only or matches(n, args.only)) and not (args.skip and matches(n, args.skip))]


def run_frontier(root: Path, args) -> dict:
    """The staged frontier grid (see the module docstring); writes and returns ``frontier.json``."""
    from ..data import load_dataset
    from ..training.trainer import load_run

    search = frontier_search(args)
    _train(root, search, args)
    recipes = pick_recipes(root, search)
    grid = frontier_grid(args, recipes)
    _train(root, _wanted(grid, args), args)
    tried = frontier_variants(args, recipes)
    _train(root, _wanted(tried, args), args)
    variants = kept_variants(root, grid, tried)
    kept = {v["run"] for v in variants if v["kept"]}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    grid += [(n, c) for n, c in frontier_variants(args, recipes, seeds) if n.rsplit("_s", 1)[0] in kept]
    _train(root, _wanted(grid, args), args)
    meta = {"recipes": recipes, "variants": variants, "grid": sorted({n.rsplit("_s", 1)[0] for n, _ in grid}),
            "first_seed": args.first_seed, "latency": {}}
    for data in _frontier_datasets(args):
        names = [p for p in meta["grid"] if p.startswith(f"frontier_{_data_tag(data)}_")
                 and finished(root / f"{p}_s{args.first_seed}")]
        models = {p: load_run(root / f"{p}_s{args.first_seed}")[0] for p in names}
        x = load_dataset(data, seed=args.first_seed).val.x[:args.latency_batch]
        meta["latency"][data] = frontier_latency(models, x, args.latency_repeats)
    (root / "frontier.json").write_text(json.dumps(meta, indent=1))
    return meta


def run(args: argparse.Namespace) -> int:
    from .report import write_frontier_report, write_report

    set_threads(args.threads)
    root = Path(args.runs) / args.name
    if args.name == "frontier":
        run_frontier(root, args)
    else:
        _train(root, _wanted(grid(args), args), args)
    if not args.no_report:
        command = getattr(args, "command_line", f"fastff experiment {args.name}")
        writer = write_frontier_report if args.name == "frontier" else write_report
        writer(root, Path(args.results), name=args.name, command=command)
    return 0
