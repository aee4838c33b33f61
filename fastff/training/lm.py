"""Train a character-level GPT (``fastff.models.gpt``) with honest model selection: the checkpoint
with the lowest validation loss is kept, and the test split is evaluated exactly once, after
selection.

Validation and test losses are measured in eval mode (what would be served: hard routing on
fastff's kernels) on fixed windows of the split, the same windows for every run. Wall-clock
time counts training steps only (evaluations excluded).

Runs go to a run directory of the run core (``fastff.training.run``): config.json (model,
training config, text source and vocabulary), model.safetensors (best so far), metrics.json
(one record per evaluation: step, seconds, train and validation loss, learning rate; the
selected step and its test loss; the median time per step) and a checkpoint to resume from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .._checks import check_choice, check_fraction, check_int
from ..data.text import CharVocab, TextSplits, batches
from ..layers.families import family
from ..models.gpt import GPT, GPTConfig
from .capacity import CapacityRecorder
from .losses import HARDENING_MODES
from .optim import LocalAdam
from .run import (CONFIG_VERSION, RunDir, Schedule, aux_loss, finish, load_weights, read_config, select_best,
                  train_loop)

OPTIMIZERS = ("adamw", "local-adam")


@dataclass
class LMTrainConfig:
    """Optimisation of one run (saved in config.json)."""
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3            # peak learning rate
    ffn_lr_mult: float = 1.0    # the feedforward layers' learning rate = lr * ffn_lr_mult
    optimizer: str = "adamw"    # or "local-adam": LocalAdam (tree blocks step once they saw local_batch_size rows)
    local_batch_size: float = 64.0
    warmup: int = 100           # steps of linear warm-up, then cosine decay to min_lr_frac * lr
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1   # decoupled, on weight matrices / tensors (not biases, norms, embeddings)
    grad_clip: float = 1.0      # global gradient-norm clip (0 = off)
    hardening: float = 0.0      # FFF: weight of hardening_loss
    hardening_mode: str = "reach"
    balance: float = 0.0        # FFF / MoE: alpha of load_balancing_loss; NeuronTree: of node_balance_loss
    eval_every: int = 100
    eval_batches: int = 20      # validation / test windows per evaluation = eval_batches * batch_size
    capacity_tokens: int = 10_000   # validation tokens the capacity diagnostics count per evaluation (0 = off)
    seed: int = 0

    def validate(self) -> "LMTrainConfig":
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup", self.warmup, 0)
        check_int("capacity_tokens", self.capacity_tokens, 0)
        check_int("seed", self.seed, 0)
        for name in ("lr", "ffn_lr_mult", "weight_decay", "grad_clip", "hardening", "balance"):
            check_fraction(name, getattr(self, name), high=float("inf"))
        check_fraction("min_lr_frac", self.min_lr_frac)
        if self.lr <= 0 or self.ffn_lr_mult <= 0:
            raise ValueError(f"lr and ffn_lr_mult must be > 0, got {self.lr} and {self.ffn_lr_mult}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("hardening_mode", self.hardening_mode, HARDENING_MODES)
        if self.optimizer == "local-adam" and (self.ffn_lr_mult != 1.0 or self.weight_decay):
            raise ValueError("optimizer 'local-adam' has one learning rate and no weight decay: set ffn_lr_mult=1 "
                             "and weight_decay=0")
        return self


@dataclass
class LMRun:
    """What a run produced: the evaluation history and the selected checkpoint's numbers."""
    history: list = field(default_factory=list)   # {"step", "seconds", "train_loss", "val_loss", "lr"}
    best_step: int = 0
    val_loss: float = math.inf
    test_loss: float | None = None
    train_seconds: float = 0.0
    ms_per_step: float = 0.0
    tokens_per_s: float = 0.0
    ffn_neurons_per_token: int = 0
    ffn_training_width: int = 0
    n_params: int = 0
    stopped: str | None = None                    # why training ended before ``steps`` (non-finite loss)


def schedule(cfg: LMTrainConfig) -> Schedule:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``lr`` to ``min_lr_frac * lr`` at the last step."""
    return Schedule(cfg.steps, cfg.warmup, "cosine", cfg.min_lr_frac)


def make_optimizer(model: GPT, cfg: LMTrainConfig) -> torch.optim.Optimizer:
    """AdamW with four groups: {feedforward, rest} x {decayed (tensors of >= 2 dims, embeddings
    excepted), not decayed}; the feedforward groups' learning rate is ``lr * ffn_lr_mult``.
    ``optimizer="local-adam"``: ``LocalAdam`` (the trees' blocks need usage counters:
    ``GPTConfig.usage_counters``), one group."""
    if cfg.optimizer == "local-adam":
        return LocalAdam(model, lr=cfg.lr, local_batch_size=cfg.local_batch_size, betas=(0.9, 0.95))
    ffn_params = {id(p) for f in model.ffns for p in f.parameters()}
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    groups = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ffn = id(p) in ffn_params
        decay = p.dim() >= 2 and id(p) not in embeddings
        groups.setdefault((ffn, decay), []).append(p)
    fused = all(p.device.type == "cpu" for ps in groups.values() for p in ps)   # one pass per tensor on CPU
    return torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
                               "lr": cfg.lr * (cfg.ffn_lr_mult if ffn else 1.0)}
                              for (ffn, decay), ps in groups.items()], lr=cfg.lr, betas=(0.9, 0.95),
                             fused=fused or None)


def eval_windows(data: torch.Tensor, context: int, n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fixed windows of a split (the same for every run): (x (n, context), y (n, context))."""
    return batches(data, context, n, torch.Generator().manual_seed(seed))


@torch.inference_mode()
def capacity(model: GPT, x: torch.Tensor, batch_size: int) -> list[dict]:
    """Capacity diagnostics (``fastff.training.capacity``) of ``model``'s routed feedforwards in
    eval mode over the token windows x (n, context); [] for a model without routed ones."""
    was = model.training
    model.eval()
    with CapacityRecorder(model) as rec:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    model.train(was)
    return rec.summary()


@torch.inference_mode()
def evaluate(model: GPT, windows: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> float:
    """Mean eval-mode cross entropy (nats per character) over ``windows``."""
    was = model.training
    model.eval()
    x, y = windows
    total = sum(model(x[i:i + batch_size], y[i:i + batch_size])[1].item() * len(x[i:i + batch_size])
                for i in range(0, len(x), batch_size))
    model.train(was)
    return total / len(x)


class _Task:
    """The run core's view of LM training: random training windows, loss + auxiliary losses,
    validation loss on fixed windows."""

    def __init__(self, model: GPT, cfg: LMTrainConfig, splits: TextSplits):
        self.model, self.cfg, self.splits = model, cfg, splits
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.val = eval_windows(splits.val, model.cfg.context, cfg.eval_batches * cfg.batch_size)

    def next_batch(self):
        return batches(self.splits.train, self.model.cfg.context, self.cfg.batch_size, self.gen)

    def loss(self, batch, step: int):
        _, loss = self.model(*batch)
        cfg = self.cfg
        return loss + aux_loss(self.model, cfg.hardening, cfg.balance, cfg.hardening_mode), loss.item()

    def evaluate(self, step: int) -> dict:
        val_loss = evaluate(self.model, self.val, self.cfg.batch_size)
        record = {"score": val_loss, "val_loss": val_loss}
        if self.cfg.capacity_tokens:
            windows = -(-self.cfg.capacity_tokens // self.model.cfg.context)
            summary = capacity(self.model, self.val[0][:windows], self.cfg.batch_size)
            if summary:
                record["capacity"] = summary
        return record

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def run_config(model_cfg: GPTConfig, cfg: LMTrainConfig, vocab: CharVocab, text: str) -> dict:
    """The run directory's config.json: model, training, data (text source and vocabulary)."""
    return {"version": CONFIG_VERSION, "task": "lm", "model": asdict(model_cfg), "train": asdict(cfg),
            "data": {"text": text, "vocab": vocab.chars}}


def fit(model_cfg: GPTConfig, cfg: LMTrainConfig, splits: TextSplits, out: str | Path, mode: str = "new",
        text: str = "shakespeare", progress: bool = True, checkpoint_every: int = 1) -> tuple[GPT, LMRun]:
    """Train a fresh GPT for ``cfg.steps`` steps on ``splits.train`` into the run directory
    ``out`` (``RunDir`` ``mode``: "new", "resume" or "overwrite"); evaluate on validation every
    ``eval_every`` steps and at the end, keeping the weights of the lowest validation loss;
    evaluate them once on test. ``text`` names the corpus in the config. Returns (model with the
    selected weights, in eval mode, LMRun)."""
    cfg.validate()
    if cfg.optimizer == "local-adam" and family(model_cfg.ffn).local_usage and not model_cfg.usage_counters:
        model_cfg = replace(model_cfg, usage_counters=True)            # LocalAdam reads the trees' usage
    if model_cfg.vocab_size != len(splits.vocab):
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} != the text's vocabulary {len(splits.vocab)}")
    with RunDir(out, mode, canonical_config) as run:
        run.write_config(run_config(model_cfg, cfg, splits.vocab, text))
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg).train()
        opt = make_optimizer(model, cfg)
        task = _Task(model, cfg, splits)
        tokens = cfg.batch_size * model_cfg.context
        loop = train_loop(run, model, opt, task, cfg.steps, lambda step: step % cfg.eval_every == 0, schedule(cfg),
                          grad_clip=cfg.grad_clip, checkpoint_every=checkpoint_every, desc=f"lm {model_cfg.ffn}",
                          progress_bar=progress, postfix=lambda r: {"val": f"{r['val_loss']:.3f}"})
        model = select_best(run, model)
        test = eval_windows(splits.test, model_cfg.context, cfg.eval_batches * cfg.batch_size)
        result = LMRun(history=loop.history, best_step=loop.best_step, val_loss=loop.best_score,
                       test_loss=evaluate(model, test, cfg.batch_size),   # the one and only test evaluation
                       train_seconds=loop.train_seconds, ms_per_step=loop.ms_per_step,
                       tokens_per_s=tokens / (loop.ms_per_step / 1e3), stopped=loop.stopped,
                       ffn_neurons_per_token=model.ffn_neurons_per_token,
                       ffn_training_width=model.ffn_training_width, n_params=model.n_params)
        finish(run, asdict(result))
    return model, result


def canonical_config(config: dict) -> dict:
    """``config`` with its model and training sections completed by the current defaults."""
    return {**config, "model": asdict(GPTConfig.from_dict(config["model"])),
            "train": asdict(LMTrainConfig(**config["train"]))}


def upgrade_config(config: dict) -> dict:
    """A config.json of the earlier format (``{"model", "train", "vocab"}``) in the current one."""
    if "model" not in config:
        raise ValueError("config.json has no 'model' section: it is not a language-model run "
                         "(a classifier run is read by `fastff report`)")
    return {"version": CONFIG_VERSION, "task": "lm", "model": asdict(GPTConfig.from_dict(config["model"])),
            "train": config.get("train", {}), "data": {"text": None, "vocab": config.get("vocab", "")}}


def load_run(run_dir: str | Path) -> tuple[GPT, CharVocab, dict]:
    """(model with the selected weights, in eval mode; vocabulary; config dict) of an LM run
    directory. The vocabulary must fit the model and the weights must have been saved with
    this config (a config edited after training is refused)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir, "lm", upgrade_config)
    try:
        model_cfg = GPTConfig.from_dict(config["model"])
    except ValueError as e:
        raise ValueError(f"{run_dir}/config.json: {e}") from None
    vocab = config["data"].get("vocab")
    if not isinstance(vocab, str) or len(vocab) != model_cfg.vocab_size or len(set(vocab)) != len(vocab):
        raise ValueError(f"{run_dir}/config.json: the vocabulary ({len(vocab) if isinstance(vocab, str) else vocab!r} "
                         f"characters) does not fit the model's vocab_size {model_cfg.vocab_size}")
    model = load_weights(run_dir, config, GPT(model_cfg))
    return model.eval(), CharVocab(vocab), config
