"""Train a classifier with one FF / FFF / NeuronTree / MoE layer (or a small ViT built from them)
with honest model selection: the checkpoint is chosen on the validation split only, and the test
split is evaluated exactly once, after selection.

A run directory holds ``model.safetensors`` (state dict), ``config.json`` (everything needed
to rebuild the model, including the input standardisation) and ``metrics.json`` (per-epoch
train/val accuracy, leaf usage, node entropy, lr and h; final test accuracy and eval time).

The default recipe is the FFF paper's (plain SGD lr 0.2, batch 256, h = 3 from the first step);
``optimizer``, ``schedule`` / ``warmup`` (per-step learning-rate schedule) and
``hardening_warmup`` (h ramped in from 0) change it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .._checks import check_choice, check_fraction, check_int
from ..data import Dataset, Split
from ..functional import bernoulli_entropy
from ..layers.families import family, family_of, feedforwards
from ..models.vit import TinyViT
from .losses import HARDENING_MODES
from .optim import LocalAdam, LocalSGD
from .routing_init import ROUTING_INITS, pca_routing_init
from .run import (CONFIG_VERSION, SCHEDULES, RunDir, Schedule, aux_loss, finish, load_weights, read_config,
                  select_best, train_loop)

ARCHS = ("mlp", "vit")
SELECT = ("val",)  # model selection split; selecting on test is deliberately impossible
OPTIMIZERS = ("sgd", "adam", "adamw", "local-sgd", "local-adam")
# the classifier's defaults for options a family has (the rest are the family's own)
CLASSIFIER_DEFAULTS = {"activation": "relu"}
# config.json sections: the model's fields, the data's; every other field is the training's
MODEL_FIELDS = ("arch", "ffn", "width", "ffn_options", "vit_dim", "vit_layers", "vit_heads", "patch", "n_features",
                "n_classes", "image_shape")
DATA_FIELDS = ("data", "limit", "val_fraction", "mean", "std")


@dataclass
class TrainConfig:
    """Everything that defines a run (saved as config.json). ``ffn`` names a feedforward family
    (``fastff.layers.FAMILIES``), ``width`` its training width and ``ffn_options`` its options,
    completed with ``CLASSIFIER_DEFAULTS`` and the family's defaults by ``validate``."""
    data: str
    ffn: str = "fff"
    width: int = 128            # training width w (FFF: 2**depth * leaf)
    ffn_options: dict = field(default_factory=dict)
    hardening: float = 3.0      # h: weight of the node-entropy loss
    hardening_mode: str = "mean"
    balance: float = 0.0        # alpha of the load-balancing loss (0 = off)
    routing_init: str = "none"  # FFF: "pca" starts every node as a balanced split (``routing_init.py``)
    arch: str = "mlp"
    vit_dim: int = 64
    vit_layers: int = 2
    vit_heads: int = 4
    patch: int = 7
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.0       # SGD only
    optimizer: str = "sgd"
    weight_decay: float = 0.0   # L2 (sgd, adam) or decoupled (adamw)
    local_batch_size: float = 64.0  # local-sgd / local-adam: rows a leaf / node / neuron sees per step
    schedule: str = "none"
    warmup: int = 0             # epochs of linear learning-rate warm-up
    hardening_warmup: int = 0   # epochs over which h ramps linearly from 0 to `hardening`
    patience: int = 0           # early stopping on validation; 0 = train all epochs
    select: str = "val"
    seed: int = 0
    limit: int | None = None    # keep only this many training rows (quick runs)
    val_fraction: float = 0.1
    # filled in from the data
    n_features: int = 0
    n_classes: int = 0
    image_shape: list | None = None
    mean: float = 0.0
    std: float = 1.0

    def validate(self) -> "TrainConfig":
        check_choice("arch", self.arch, ARCHS)
        check_choice("select", self.select, SELECT)
        check_choice("hardening_mode", self.hardening_mode, HARDENING_MODES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("routing_init", self.routing_init, ROUTING_INITS)
        fam = family(self.ffn)
        self.ffn = fam.name
        if not isinstance(self.ffn_options, dict):
            raise ValueError(f"ffn_options must be a dict of {fam.name} options, got {self.ffn_options!r}")
        self.ffn_options = fam.resolve(self.width, self.ffn_options, defaults=CLASSIFIER_DEFAULTS)
        if self.routing_init != "none" and (self.ffn != "fff" or self.arch != "mlp"):
            raise ValueError(f"routing_init={self.routing_init!r} needs ffn 'fff' with arch 'mlp', "
                             f"got ffn={self.ffn!r}, arch={self.arch!r}")
        for name in ("width", "epochs", "batch_size", "vit_dim", "vit_layers", "vit_heads", "patch"):
            check_int(name, getattr(self, name), 1)
        check_int("patience", self.patience, 0)
        check_int("warmup", self.warmup, 0, self.epochs - 1)
        check_int("hardening_warmup", self.hardening_warmup, 0, self.epochs)
        for name in ("hardening", "balance", "lr", "momentum", "weight_decay", "local_batch_size"):
            check_fraction(name, getattr(self, name), high=float("inf"))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum applies to optimizer 'sgd' only, got momentum={self.momentum} "
                             f"with optimizer {self.optimizer!r}")
        if self.weight_decay and self.optimizer.startswith("local"):
            raise ValueError(f"weight_decay is not supported by optimizer {self.optimizer!r}")
        if self.local_batch_size <= 0:
            raise ValueError(f"local_batch_size must be > 0, got {self.local_batch_size}")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from its fields (unknown ones are an error listing the known ones)."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {', '.join(f.name for f in fields(cls))}")
        return cls(**values)

    def sections(self) -> dict:
        """config.json of this run: {"version", "task", "model", "train", "data"}."""
        values = asdict(self)
        model = {k: values.pop(k) for k in MODEL_FIELDS}
        data = {k: values.pop(k) for k in DATA_FIELDS}
        return {"version": CONFIG_VERSION, "task": "classifier", "model": model, "train": values, "data": data}


# fields of the earlier flat configs that belong to the feedforward, moved into ffn_options
FLAT_FFN_FIELDS = ("leaf", "trees", "top_k", "activation", "region_leak", "master_leaf", "train_mode")


def upgrade_config(flat: dict) -> dict:
    """A config.json of the earlier flat format (``model`` = the kind, per-kind fields) in the current one."""
    flat = dict(flat)
    if "data" not in flat:
        raise ValueError("config.json has no 'data' field: it is not a classifier run (a language-model run is "
                         "read by `fastff lm generate`)")
    kind = family(flat.pop("model", "fff"))
    options = {}
    for name in FLAT_FFN_FIELDS:
        if name in flat:
            value = flat.pop(name)
            if kind.option(name) is not None:
                options[name] = value
    cfg = TrainConfig.from_dict({**flat, "ffn": kind.name, "ffn_options": options}).validate()
    return cfg.sections()


def canonical_config(config: dict) -> dict:
    """``config`` (``TrainConfig.sections``) completed by the current defaults."""
    return config_from_sections(config).sections()


def config_from_sections(config: dict) -> TrainConfig:
    """The TrainConfig of a config.json (``TrainConfig.sections``)."""
    return TrainConfig.from_dict({**config["model"], **config["train"], **config["data"]}).validate()


def ffn_layer(cfg: TrainConfig, in_features: int, out_features: int) -> nn.Module:
    """The layer under test, of family ``cfg.ffn`` at training width ``cfg.width``; under a local
    optimiser with the usage counters its family needs (``Family.local_usage``)."""
    fam = family(cfg.ffn)
    local = cfg.optimizer.startswith("local") and fam.local_usage is not None
    return fam.build(in_features, out_features, cfg.width, cfg.ffn_options, **({"usage": fam.local_usage} if local else {}))


class FlatClassifier(nn.Module):
    """x (B, features) -> logits (B, classes) through a single feedforward layer, as in the FFF
    paper's Table 1 (the layer maps inputs straight to class logits)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.layer = ffn_layer(cfg, cfg.n_features, cfg.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def build_model(cfg: TrainConfig) -> nn.Module:
    """A fresh model for ``cfg`` (random init from the current torch RNG)."""
    if cfg.arch == "vit":
        return TinyViT(cfg.image_shape, cfg.n_classes, lambda i, o: ffn_layer(cfg, i, o), patch=cfg.patch,
                       dim=cfg.vit_dim, layers=cfg.vit_layers, heads=cfg.vit_heads)
    return FlatClassifier(cfg)


def neurons_per_inference(model: nn.Module) -> int:
    """Hidden neurons evaluated per input row (per token for the ViT), summed over feedforwards."""
    return sum(m.neurons_per_inference for m in feedforwards(model))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 4096, stats: bool = False) -> dict:
    """Eval-mode accuracy on ``split`` (hard routing). With ``stats``: also, per routed
    feedforward (``Family.routing``), the row counts of its last routing level (leaves,
    experts, deepest nodes) and the mean decision entropy (nats) over its decided levels
    (None without decisions), from hooks on the layer inputs. Returns {"acc", "seconds", and
    with stats "leaf_usage": [[counts]], "node_entropy": [float | None]}."""
    model.eval()
    routed = [(m, f) for m in feedforwards(model) if (f := family_of(m)).routing is not None] if stats else []
    usage: list = [None] * len(routed)
    entropy = [[0.0, 0] for _ in routed]

    def hook(i):
        def fn(module, inputs):
            r = routed[i][1].routing(module, inputs[0].reshape(-1, module.in_features))
            counts = torch.bincount(r.units[-1].reshape(-1), minlength=r.sizes[-1])
            usage[i] = counts if usage[i] is None else usage[i] + counts
            decided = [l for l in r.logits if l is not None]
            if decided:
                entropy[i][0] += bernoulli_entropy(torch.cat(decided, 1)).mean(1).sum().item()
                entropy[i][1] += len(decided[0])
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, (m, _) in enumerate(routed)]
    try:
        correct, start = 0, time.perf_counter()
        for lo in range(0, len(split), batch_size):
            logits = model(split.x[lo:lo + batch_size])
            correct += (logits.argmax(-1) == split.y[lo:lo + batch_size]).sum().item()
        seconds = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    out = {"acc": 100.0 * correct / max(1, len(split)), "seconds": seconds}
    if stats:
        out["leaf_usage"] = [[] if u is None else u.tolist() for u in usage]
        out["node_entropy"] = [e / n if n else None for e, n in entropy]
    return out


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with ``momentum``), Adam or AdamW at ``cfg.lr`` with ``cfg.weight_decay``, or the
    localised ``LocalSGD`` / ``LocalAdam`` with ``cfg.local_batch_size``."""
    if cfg.optimizer == "local-sgd":
        return LocalSGD(model, lr=cfg.lr, local_batch_size=cfg.local_batch_size)
    if cfg.optimizer == "local-adam":
        return LocalAdam(model, lr=cfg.lr, local_batch_size=cfg.local_batch_size)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def schedule(cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """Linear warm-up over ``cfg.warmup`` epochs, then ``cfg.schedule`` (cosine to 0, step, none)."""
    return Schedule(cfg.epochs * steps_per_epoch, cfg.warmup * steps_per_epoch, cfg.schedule)


def hardening_weight(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """h at optimiser step ``step``: ramps linearly from 0 to ``cfg.hardening`` over the first
    ``cfg.hardening_warmup`` epochs (so routing can spread before it hardens), then stays."""
    ramp = cfg.hardening_warmup * steps_per_epoch
    return cfg.hardening * min(1.0, step / ramp) if ramp else cfg.hardening


@dataclass
class RunResult:
    config: dict
    epochs: list = field(default_factory=list)     # one record per epoch
    best_epoch: int = 0
    test: dict = field(default_factory=dict)
    neurons_per_inference: int = 0
    training_seconds: float = 0.0
    train_acc: float = 0.0      # memorisation accuracy of the selected checkpoint, whole train split
    stopped: str | None = None


PROBE_ROWS = 10_000


class EpochOrder:
    """Mini-batch indices: every epoch a fresh random permutation of ``n`` rows (from a
    generator seeded with ``seed``), cut into batches of ``batch_size``; the state (generator,
    current permutation, position) resumes mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = None, 0

    def next(self) -> torch.Tensor:
        if self.perm is None or self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"], state["pos"]


class _Task:
    """The run core's view of classifier training: shuffled epochs, cross entropy + auxiliary
    losses, per-epoch evaluation on a train probe and the validation split."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, data: Dataset):
        self.model, self.cfg, self.data = model, cfg, data
        self.steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
        self.order = EpochOrder(len(data.train), cfg.batch_size, cfg.seed)
        self.probe = Split(data.train.x[:PROBE_ROWS], data.train.y[:PROBE_ROWS])

    def next_batch(self):
        idx = self.order.next()
        return self.data.train.x[idx], self.data.train.y[idx]

    def loss(self, batch, step: int):
        x, y = batch
        pred = nn.functional.cross_entropy(self.model(x), y)
        h = hardening_weight(self.cfg, step, self.steps_per_epoch)
        return pred + aux_loss(self.model, h, self.cfg.balance, self.cfg.hardening_mode), pred.item()

    def evaluate(self, step: int) -> dict:
        train = evaluate(self.model, self.probe, stats=True)
        val = evaluate(self.model, self.data.val)
        return {"score": -val["acc"], "epoch": step // self.steps_per_epoch, "train_acc": train["acc"],
                "val_acc": val["acc"], "leaf_usage": train["leaf_usage"], "node_entropy": train["node_entropy"],
                "hardening": hardening_weight(self.cfg, step - 1, self.steps_per_epoch)}

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def fit(cfg: TrainConfig, data: Dataset, out: str | Path, mode: str = "new", progress: bool = True,
        checkpoint_every: int = 1) -> tuple[nn.Module, RunResult]:
    """Train ``cfg`` on ``data`` into the run directory ``out`` (``RunDir`` ``mode``: "new",
    "resume" or "overwrite"); select the epoch with the best validation accuracy (earliest on
    ties; stop after ``patience`` epochs without improvement), then evaluate the selected
    model once on the test split. Returns (selected model, RunResult).

    Per-epoch train accuracy, leaf usage and node entropy are measured in eval mode on the first
    ``PROBE_ROWS`` rows of the (randomly ordered) train split, to save time; the selected
    checkpoint's memorisation accuracy ``train_acc`` is measured on the whole train split. Each
    epoch also records the learning rate and hardening weight h of its last optimiser step."""
    cfg.n_features, cfg.n_classes = data.n_features, data.n_classes
    cfg.image_shape = list(data.image_shape) if data.image_shape else None
    cfg.mean, cfg.std = data.mean, data.std
    cfg.validate()
    with RunDir(out, mode, canonical_config) as run:
        run.write_config(cfg.sections())
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        if cfg.routing_init == "pca":
            pca_routing_init(model.layer, data.train.x)
        opt = make_optimizer(cfg, model)
        task = _Task(model, cfg, data)
        spe = task.steps_per_epoch
        loop = train_loop(run, model.train(), opt, task, cfg.epochs * spe, lambda step: step % spe == 0,
                          schedule(cfg, spe), patience=cfg.patience, checkpoint_every=checkpoint_every,
                          desc=f"{cfg.ffn} w={cfg.width}", progress_bar=progress,
                          postfix=lambda r: {"train": f"{r['train_acc']:.1f}", "val": f"{r['val_acc']:.1f}"})
        model = select_best(run, model)
        result = RunResult(config=asdict(cfg), epochs=loop.history, best_epoch=loop.best_step // spe,
                           neurons_per_inference=neurons_per_inference(model), training_seconds=loop.train_seconds,
                           train_acc=evaluate(model, data.train)["acc"], stopped=loop.stopped)
        test = evaluate(model, data.test)                                  # the one and only test evaluation
        result.test = {"acc": test["acc"], "eval_seconds": test["seconds"], "rows": len(data.test)}
        finish(run, metrics(result))
    return model, result


def metrics(result: RunResult) -> dict:
    """metrics.json of a finished run."""
    sel = result.epochs[result.best_epoch - 1] if result.best_epoch else {}
    return {"history": result.epochs, "best_epoch": result.best_epoch,
            "selected": {"train_acc": result.train_acc, "val_acc": sel.get("val_acc"),
                         "leaf_usage": sel.get("leaf_usage"), "node_entropy": sel.get("node_entropy")},
            "test": result.test, "neurons_per_inference": result.neurons_per_inference,
            "training_seconds": result.training_seconds, "stopped": result.stopped}


def load_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig of a classifier run directory (older flat configs converted)."""
    return config_from_sections(read_config(Path(run_dir), "classifier", upgrade_config))


def load_run(run_dir: str | Path) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a run directory from config.json and load its selected weights
    (eval mode; refused if the config was changed after training). Inputs must be standardised
    with the config's ``mean`` / ``std``."""
    run_dir = Path(run_dir)
    config = read_config(run_dir, "classifier", upgrade_config)
    cfg = config_from_sections(config)
    return load_weights(run_dir, config, build_model(cfg)).eval(), cfg
