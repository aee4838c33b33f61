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

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._checks import check_choice, check_fraction, check_int
from ..data import Dataset, Split
from ..functional import bernoulli_entropy, hard_path
from ..io import load, save
from ..layers import FFF, FFN_KINDS, DenseFF, MoE, NeuronTree, make_ffn
from ..layers.fff import TRAIN_MODES
from ..models.vit import TinyViT
from .losses import HARDENING_MODES, hardening_loss, load_balancing_loss
from .optim import LOCAL_USAGE, LocalAdam, LocalSGD
from .routing_init import ROUTING_INITS, pca_routing_init

MODELS = (*FFN_KINDS, "ff")             # "ff": the name earlier runs used for "dense"
ARCHS = ("mlp", "vit")
MASTER_LEAF = ("none", "scalar", "token")
SELECT = ("val",)  # model selection split; selecting on test is deliberately impossible
OPTIMIZERS = ("sgd", "adam", "adamw", "local-sgd", "local-adam")
SCHEDULES = ("none", "cosine", "step")   # learning-rate decay over the run (after any warm-up)
STEP_MILESTONES = (0.5, 0.75)           # "step": lr x0.1 after these fractions of the decay steps


@dataclass
class TrainConfig:
    """Everything that defines a run (saved as config.json)."""
    data: str
    model: str = "fff"
    width: int = 128            # training width w (FFF: 2**depth * leaf)
    leaf: int = 8               # FFF leaf width / MoE expert width
    hardening: float = 3.0      # h: weight of the node-entropy loss
    hardening_mode: str = "mean"
    region_leak: float = 0.0
    balance: float = 0.0        # alpha of the load-balancing loss (0 = off)
    master_leaf: str = "none"
    train_mode: str = "soft"   # FFF: "soft" or "hard_path"
    routing_init: str = "none"  # FFF: "pca" starts every node as a balanced split (``routing_init.py``)
    activation: str = "relu"
    top_k: int = 1              # MoE experts per row
    trees: int = 1              # NeuronTree parallel trees
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
        check_choice("model", self.model, MODELS)
        check_choice("arch", self.arch, ARCHS)
        check_choice("select", self.select, SELECT)
        check_choice("hardening_mode", self.hardening_mode, HARDENING_MODES)
        check_choice("master_leaf", self.master_leaf, MASTER_LEAF)
        check_choice("train_mode", self.train_mode, TRAIN_MODES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("routing_init", self.routing_init, ROUTING_INITS)
        if self.routing_init != "none" and (self.model != "fff" or self.arch != "mlp"):
            raise ValueError(f"routing_init={self.routing_init!r} needs model 'fff' with arch 'mlp', "
                             f"got model={self.model!r}, arch={self.arch!r}")
        for name in ("width", "leaf", "top_k", "trees", "epochs", "batch_size", "vit_dim", "vit_layers",
                     "vit_heads", "patch"):
            check_int(name, getattr(self, name), 1)
        check_int("patience", self.patience, 0)
        check_int("warmup", self.warmup, 0, self.epochs - 1)
        check_int("hardening_warmup", self.hardening_warmup, 0, self.epochs)
        check_fraction("region_leak", self.region_leak, 0.5)
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
        if self.model in ("fff", "moe"):
            ratio = self.width // self.leaf
            if self.width % self.leaf or ratio & (ratio - 1):
                raise ValueError(f"width must be leaf * a power of two for model {self.model!r}; "
                                 f"got width={self.width}, leaf={self.leaf}")
        if self.model == "moe" and self.top_k > self.width // self.leaf:
            raise ValueError(f"top_k must be <= experts = width/leaf = {self.width // self.leaf}, got {self.top_k}")
        if self.model == "neuron-tree" and self.width < 2 * self.trees:
            raise ValueError(f"neuron-tree width must be >= 2 * trees, got width={self.width}, trees={self.trees}")
        return self


def ffn_layer(cfg: TrainConfig, in_features: int, out_features: int) -> nn.Module:
    """The layer under test, built by ``fastff.layers.make_ffn`` at training width ``cfg.width``
    (FFF / MoE leaves of ``cfg.leaf``, ``cfg.trees`` neuron trees). The local optimisers need
    usage counters (``optim.LOCAL_USAGE``)."""
    kind = "dense" if cfg.model == "ff" else cfg.model
    usage = LOCAL_USAGE.get(kind) if cfg.optimizer.startswith("local") else None
    options = {} if usage is None else dict(usage=usage)
    if kind == "fff":
        options |= dict(region_leak=cfg.region_leak, train_mode=cfg.train_mode,
                        master_leaf=None if cfg.master_leaf == "none" else cfg.master_leaf)
    return make_ffn(kind, in_features, out_features, cfg.width, leaf=cfg.leaf, trees=cfg.trees, top_k=cfg.top_k,
                    activation=cfg.activation, **options)


class FlatClassifier(nn.Module):
    """x (B, features) -> logits (B, classes) through a single FF / FFF / NeuronTree / MoE layer,
    as in the FFF paper's Table 1 (the layer maps inputs straight to class logits)."""

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


FF_LAYERS = (FFF, DenseFF, MoE, NeuronTree)


def ff_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost FF-type layers of ``model`` (an FFF's master leaf counts as part of its FFF)."""
    if isinstance(model, FF_LAYERS):
        return [model]
    return [m for child in model.children() for m in ff_layers(child)]


def neurons_per_inference(model: nn.Module) -> int:
    """Hidden neurons evaluated per input row (per token for the ViT), summed over FF-type layers."""
    return sum(m.neurons_per_inference for m in ff_layers(model))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 4096, stats: bool = False) -> dict:
    """Eval-mode accuracy on ``split`` (hard routing). With ``stats``: also per-layer hard leaf /
    expert counts and the mean node-decision entropy (nats) of every FFF, from hooks on the layer
    inputs. Returns {"acc", "seconds", and with stats "leaf_usage": [[counts]], "node_entropy"}."""
    model.eval()
    routed = [m for m in model.modules() if isinstance(m, (FFF, MoE))] if stats else []
    usage = [torch.zeros(m.n_leaves if isinstance(m, FFF) else m.experts, dtype=torch.long) for m in routed]
    entropy = [[0.0, 0] for _ in routed]

    def hook(i):
        def fn(module, inputs):
            x = inputs[0].reshape(-1, module.in_features)
            if isinstance(module, FFF):
                leaf = hard_path(x, module.node_w, module.node_b, module.depth).leaf
                if module.depth:
                    logits = x @ module.node_w.T + module.node_b
                    entropy[i][0] += bernoulli_entropy(logits).mean(1).sum().item()
                    entropy[i][1] += len(x)
            else:
                leaf = module.router(x).argmax(-1)
            usage[i] += torch.bincount(leaf, minlength=len(usage[i]))
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(routed)]
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
        out["leaf_usage"] = [u.tolist() for u in usage]
        out["node_entropy"] = [e / n if n else None for e, n in entropy]
    return out


def _has(model: nn.Module, kinds) -> bool:
    return any(isinstance(m, kinds) for m in model.modules())


def aux_loss(model: nn.Module, cfg: TrainConfig, hardening: float) -> torch.Tensor | float:
    """``hardening`` · node entropy (FFF only) + load balancing (FFF / MoE) for the last training
    forward."""
    loss = 0.0
    if hardening > 0 and _has(model, FFF):
        loss = loss + hardening * hardening_loss(model, cfg.hardening_mode)
    if cfg.balance > 0 and _has(model, (FFF, MoE)):
        loss = loss + load_balancing_loss(model, cfg.balance)
    return loss


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


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` for optimiser step ``step`` (0-based): linear warm-up over
    ``cfg.warmup`` epochs, then ``cfg.schedule`` over the remaining steps ("cosine": half a
    cosine from 1 to 0; "step": x0.1 after each of ``STEP_MILESTONES``; "none": 1)."""
    warm, total = cfg.warmup * steps_per_epoch, cfg.epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / (total - warm)                  # fraction of the decay phase done, in [0, 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return 0.1 ** sum(t >= m for m in STEP_MILESTONES)
    return 1.0


def hardening_weight(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """h at optimiser step ``step``: ramps linearly from 0 to ``cfg.hardening`` over the first
    ``cfg.hardening_warmup`` epochs (so routing can spread before it hardens), then stays."""
    ramp = cfg.hardening_warmup * steps_per_epoch
    return cfg.hardening * min(1.0, step / ramp) if ramp else cfg.hardening


@dataclass
class RunResult:
    config: dict
    epochs: list = field(default_factory=list)
    best_epoch: int = 0
    test: dict = field(default_factory=dict)
    neurons_per_inference: int = 0
    training_seconds: float = 0.0
    train_acc: float = 0.0      # memorisation accuracy of the selected checkpoint, whole train split


PROBE_ROWS = 10_000


def fit(cfg: TrainConfig, data: Dataset, progress: bool = True) -> tuple[nn.Module, RunResult]:
    """Train ``cfg`` on ``data``; select the epoch with the best validation accuracy (earliest on
    ties; stop after ``patience`` epochs without improvement), then evaluate the selected
    model once on the test split. Returns (selected model, RunResult).

    Per-epoch train accuracy, leaf usage and node entropy are measured in eval mode on the first
    ``PROBE_ROWS`` rows of the (randomly ordered) train split, to save time; the selected
    checkpoint's memorisation accuracy ``train_acc`` is measured on the whole train split. Each
    epoch also records the learning rate and hardening weight h of its last optimiser step."""
    from tqdm.auto import tqdm

    cfg.n_features, cfg.n_classes = data.n_features, data.n_classes
    cfg.image_shape = list(data.image_shape) if data.image_shape else None
    cfg.mean, cfg.std = data.mean, data.std
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.routing_init == "pca":
        pca_routing_init(model.layer, data.train.x)
    opt = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step, steps_per_epoch))
    shuffle = torch.Generator().manual_seed(cfg.seed)
    result = RunResult(config=asdict(cfg), neurons_per_inference=neurons_per_inference(model))
    best_acc, best_state, since_best = -1.0, None, 0
    start = time.perf_counter()
    probe = Split(data.train.x[:PROBE_ROWS], data.train.y[:PROBE_ROWS])
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{cfg.model} w={cfg.width}", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        total, n = 0.0, 0
        for idx in torch.randperm(len(data.train), generator=shuffle).split(cfg.batch_size):
            x, y = data.train.x[idx], data.train.y[idx]
            lr, h = opt.param_groups[0]["lr"], hardening_weight(cfg, sched.last_epoch, steps_per_epoch)
            loss = nn.functional.cross_entropy(model(x), y) + aux_loss(model, cfg, h)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        train = evaluate(model, probe, stats=True)
        val = evaluate(model, data.val)
        result.epochs.append({"epoch": epoch, "loss": total / n, "train_acc": train["acc"], "val_acc": val["acc"],
                              "leaf_usage": train["leaf_usage"], "node_entropy": train["node_entropy"],
                              "lr": lr, "hardening": h})
        bar.set_postfix(loss=f"{total / n:.3f}", train=f"{train['acc']:.1f}", val=f"{val['acc']:.1f}")
        if not math.isfinite(total):
            break
        if val["acc"] > best_acc:
            best_acc, best_state, since_best, result.best_epoch = val["acc"], copy.deepcopy(model.state_dict()), 0, epoch
        else:
            since_best += 1
            if cfg.patience and since_best >= cfg.patience:
                break
    result.training_seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    result.train_acc = evaluate(model, data.train)["acc"]
    test = evaluate(model, data.test)                                  # the one and only test evaluation
    result.test = {"acc": test["acc"], "eval_seconds": test["seconds"], "rows": len(data.test)}
    return model, result


def save_run(out: str | Path, model: nn.Module, result: RunResult) -> Path:
    """Write model.safetensors (``fastff.save``), config.json and metrics.json into ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save(model, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(result.config, indent=1))
    sel = result.epochs[result.best_epoch - 1] if result.best_epoch else {}
    metrics = {"epochs": result.epochs, "best_epoch": result.best_epoch,
               "selected": {"train_acc": result.train_acc, "val_acc": sel.get("val_acc"),
                            "leaf_usage": sel.get("leaf_usage"), "node_entropy": sel.get("node_entropy")},
               "test": result.test, "neurons_per_inference": result.neurons_per_inference,
               "training_seconds": result.training_seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out


def load_run(run_dir: str | Path) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a run directory from config.json and load its weights with
    ``fastff.load`` (eval mode). Inputs must be standardised with the config's ``mean`` / ``std``."""
    run_dir = Path(run_dir)
    cfg = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    return load(run_dir / "model.safetensors", model=build_model(cfg)).eval(), cfg
