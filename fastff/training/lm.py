"""Train a character-level GPT (``fastff.models.gpt``) with honest model selection: the checkpoint
with the lowest validation loss is kept, and the test split is evaluated exactly once, after
selection.

Validation and test losses are measured in eval mode (what would be served: hard routing on
fastff's kernels) on fixed windows of the split, the same windows for every run. Wall-clock
time counts training steps only (evaluations excluded).

A run directory holds ``model.safetensors`` (``fastff.save``), ``config.json`` (model, training
config and vocabulary: everything needed to rebuild the model) and ``metrics.json`` (one record
per evaluation: step, seconds, train and validation loss, learning rate; the selected step and
its test loss; the median time per step).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .._checks import check_choice, check_fraction, check_int
from ..data.text import CharVocab, TextSplits, batches
from ..io import load, save
from ..layers import FFF, MoE
from ..models.gpt import GPT, GPTConfig
from .losses import hardening_loss, load_balancing_loss
from .optim import LOCAL_USAGE, LocalAdam

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
    balance: float = 0.0        # FFF / MoE: alpha of load_balancing_loss
    eval_every: int = 100
    eval_batches: int = 20      # validation / test windows per evaluation = eval_batches * batch_size
    seed: int = 0

    def validate(self) -> "LMTrainConfig":
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup", self.warmup, 0)
        check_int("seed", self.seed, 0)
        for name in ("lr", "ffn_lr_mult", "weight_decay", "grad_clip", "hardening", "balance"):
            check_fraction(name, getattr(self, name), high=float("inf"))
        check_fraction("min_lr_frac", self.min_lr_frac)
        if self.lr <= 0 or self.ffn_lr_mult <= 0:
            raise ValueError(f"lr and ffn_lr_mult must be > 0, got {self.lr} and {self.ffn_lr_mult}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "local-adam" and (self.ffn_lr_mult != 1.0 or self.weight_decay):
            raise ValueError("optimizer 'local-adam' has one learning rate and no weight decay: set ffn_lr_mult=1 "
                             "and weight_decay=0")
        return self


@dataclass
class LMRun:
    """What a run produced: the evaluation history and the selected checkpoint's numbers."""
    model: dict
    train: dict
    vocab: str
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


def lr_at(cfg: LMTrainConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then a cosine from
    ``lr`` to ``min_lr_frac * lr`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: GPT, cfg: LMTrainConfig) -> torch.optim.Optimizer:
    """AdamW with four groups: {feedforward, rest} x {decayed (tensors of >= 2 dims, embeddings
    excepted), not decayed}; the feedforward groups' learning rate is scaled by ``ffn_lr_mult``.
    ``optimizer="local-adam"``: ``LocalAdam`` (the trees' blocks need ``usage`` counters: ``fit``
    switches them on), one group."""
    if cfg.optimizer == "local-adam":
        opt = LocalAdam(model, lr=cfg.lr, local_batch_size=cfg.local_batch_size, betas=(0.9, 0.95))
        for group in opt.param_groups:
            group["lr_mult"] = 1.0
        return opt
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
                               "lr_mult": cfg.ffn_lr_mult if ffn else 1.0}
                              for (ffn, decay), ps in groups.items()], lr=cfg.lr, betas=(0.9, 0.95),
                             fused=fused or None)


def aux_loss(model: GPT, cfg: LMTrainConfig) -> torch.Tensor | float:
    """Hardening (FFF) and load balancing (FFF / MoE) of the last training forward."""
    loss = 0.0
    if cfg.hardening > 0 and any(isinstance(f, FFF) for f in model.ffns):
        loss = loss + cfg.hardening * hardening_loss(model)
    if cfg.balance > 0 and any(isinstance(f, (FFF, MoE)) for f in model.ffns):
        loss = loss + load_balancing_loss(model, cfg.balance)
    return loss


def eval_windows(data: torch.Tensor, context: int, n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fixed windows of a split (the same for every run): (x (n, context), y (n, context))."""
    return batches(data, context, n, torch.Generator().manual_seed(seed))


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


def fit(model_cfg: GPTConfig, cfg: LMTrainConfig, splits: TextSplits, progress: bool = True) -> tuple[GPT, LMRun]:
    """Train a fresh GPT for ``cfg.steps`` steps on ``splits.train``; evaluate on validation every
    ``eval_every`` steps and at the end; keep the weights of the lowest validation loss; evaluate
    them once on test. Returns (model with the selected weights, in eval mode, LMRun)."""
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.optimizer == "local-adam" and model_cfg.ffn in LOCAL_USAGE:     # LocalAdam reads the trees' usage
        model_cfg = replace(model_cfg, ffn_options={"usage": LOCAL_USAGE[model_cfg.ffn], **model_cfg.ffn_options})
    if model_cfg.vocab_size != len(splits.vocab):
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} != the text's vocabulary {len(splits.vocab)}")
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).train()
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    val = eval_windows(splits.val, model_cfg.context, cfg.eval_batches * cfg.batch_size)
    run = LMRun(model=asdict(model_cfg), train=asdict(cfg), vocab=splits.vocab.chars,
                ffn_neurons_per_token=model.ffn_neurons_per_token, ffn_training_width=model.ffn_training_width,
                n_params=model.n_params)
    best_state, step_times, losses = None, [], []
    tokens = cfg.batch_size * model_cfg.context
    bar = tqdm(range(cfg.steps), desc=f"lm {model_cfg.ffn}", disable=not progress, leave=False, unit="step")
    for step in bar:
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        x, y = batches(splits.train, model_cfg.context, cfg.batch_size, gen)
        start = time.perf_counter()
        _, loss = model(x, y)
        total = loss + aux_loss(model, cfg)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss became {losses[-1]} at step {step + 1}; lower the lr")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val_loss = evaluate(model, val, cfg.batch_size)
            recent = losses[-cfg.eval_every:]
            run.history.append({"step": step + 1, "seconds": sum(step_times), "train_loss": sum(recent) / len(recent),
                                "val_loss": val_loss, "lr": lr})
            if val_loss < run.val_loss:
                run.val_loss, run.best_step, best_state = val_loss, step + 1, copy.deepcopy(model.state_dict())
            bar.set_postfix(val=f"{val_loss:.3f}", tok_s=f"{tokens / statistics.median(step_times[-20:]):.0f}")
    run.train_seconds = sum(step_times)
    run.ms_per_step = 1e3 * statistics.median(step_times[min(5, len(step_times) - 1):])
    run.tokens_per_s = tokens / (run.ms_per_step / 1e3)
    model.load_state_dict(best_state)
    test = eval_windows(splits.test, model_cfg.context, cfg.eval_batches * cfg.batch_size)
    run.test_loss = evaluate(model, test, cfg.batch_size)            # the one and only test evaluation
    return model.eval(), run


def save_run(out: str | Path, model: GPT, run: LMRun) -> Path:
    """Write model.safetensors, config.json (model, train, vocab) and metrics.json into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save(model, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model": run.model, "train": run.train, "vocab": run.vocab},
                                                indent=1))
    metrics = {k: v for k, v in asdict(run).items() if k not in ("model", "train", "vocab")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out


def load_run(run_dir: str | Path) -> tuple[GPT, CharVocab, dict]:
    """(model in eval mode, vocabulary, config dict) of a run directory written by ``save_run``."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not an LM run directory (no config.json); train one with "
                                f"`fastff lm train --out {run_dir}`")
    config = json.loads((run_dir / "config.json").read_text())
    model = load(run_dir / "model.safetensors", model=GPT(GPTConfig.from_dict(config["model"])))
    return model.eval(), CharVocab(config["vocab"]), config
