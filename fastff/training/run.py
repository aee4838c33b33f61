"""The run core shared by the classifier and language-model trainers: run directories that are
never lost, one learning-rate schedule, one auxiliary-loss assembly, and one training loop
that keeps the best model on validation.

A run directory holds:

- ``config.json``: ``{"version", "task", "model", "train", "data"}``, written before training;
- ``model.safetensors``: the best-so-far model (``fastff.save``), rewritten whenever validation
  improves; its metadata records the SHA-256 of the config (``config_sha256``), so weights and
  config that do not belong together are refused when loaded;
- ``metrics.json``: the evaluation history, the selected step and, once the run has ended,
  ``"finished": true`` and the test numbers;
- ``checkpoint.pt``: everything needed to continue (weights, optimiser, step, RNG and
  data-order state, history), written every ``checkpoint_every`` evaluations and when
  SIGINT / SIGTERM arrives; a resumed run ends with the same weights as an uninterrupted one;
- ``.lock``: held (``flock``) while a process writes the run, so two cannot mix.

Every file is written atomically (temporary file, fsync, rename).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from .._checks import check_choice
from ..io import load, save, saved_metadata
from ..layers.families import family_of
from ..progress import progress
from .losses import hardening_loss, load_balancing_loss, node_balance_loss

CONFIG_VERSION = 2
FILES = ("config.json", "metrics.json", "model.safetensors", "checkpoint.pt")
SCHEDULES = ("none", "cosine", "step")
STEP_MILESTONES = (0.5, 0.75)           # "step": lr x0.1 after these fractions of the decay steps
FILE_MODE = 0o644                       # run files are readable by others, like files written with open()


class RunLocked(ValueError):
    """Another process holds the run directory's lock (it is training that run now)."""


class Interrupted(Exception):
    """Training stopped by SIGINT / SIGTERM after writing a checkpoint; ``str()`` says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------- files

def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file if it is not one."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or train the run again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def config_digest(config: dict) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys): what the weights record."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def read_config(run_dir: Path, task: str, upgrade: Callable[[dict], dict]) -> dict:
    """The config of a run directory of ``task`` (``upgrade`` converts an older format), checked:
    version, task and sections present; ValueError naming the file and what to change."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); train one with "
                                f"`fastff {'lm train' if task == 'lm' else 'train'} --out {run_dir}`")
    config = read_json(path)
    if "version" not in config:
        config = upgrade(config)
    if config.get("version") != CONFIG_VERSION:
        raise ValueError(f"{path}: config version {config.get('version')!r} is not one this fastff reads "
                         f"({CONFIG_VERSION})")
    if config.get("task") != task:
        other = {"lm": "fastff lm generate / lm inspect", "classifier": "fastff report"}.get(config.get("task"), "?")
        raise ValueError(f"{path} is a {config.get('task')!r} run, not a {task!r} run; use it with {other}")
    missing = [k for k in ("model", "train", "data") if not isinstance(config.get(k), dict)]
    if missing:
        raise ValueError(f"{path} lacks the section(s) {', '.join(missing)}; it is not a complete run config")
    return config


def load_weights(run_dir: Path, config: dict, model: nn.Module) -> nn.Module:
    """``model`` with the run's selected weights, after checking that they were saved with this
    config (the SHA-256 of ``config`` as written in config.json, recorded in the weights'
    metadata; runs of the older format record none). The digest covers the file's own content,
    so options added to fastff later (which a config read today would gain with their defaults)
    do not invalidate finished runs."""
    path = Path(run_dir) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no model.safetensors yet: the run has not reached its first "
                                f"evaluation; continue it with --resume")
    recorded = saved_metadata(path).get("config_sha256")
    if recorded is not None and recorded != config_digest(config):
        raise ValueError(f"{run_dir}/config.json does not match {path} (the config, vocabulary included, was "
                         f"changed after training); restore the original config.json")
    return load(path, model=model)


class RunDir:
    """The directory of one run, locked for this process (see the module docstring).

    ``mode``: ``"new"`` (refuse a directory that holds a run), ``"resume"`` (continue the
    interrupted run there) or ``"overwrite"`` (delete the run there first). ``--out`` is
    validated here, before any training. ``canonical(config)``: the config in the current
    form (options added to fastff since it was written take their defaults); the resume check
    compares canonical configs, so a run resumes across such additions."""

    def __init__(self, path: str | os.PathLike, mode: str = "new", canonical: Callable[[dict], dict] = dict):
        check_choice("mode", mode, ("new", "resume", "overwrite"))
        self.path, self.canonical = Path(path), canonical
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file, not a directory; choose a directory for the run")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".lock", "w")
        except OSError as e:
            raise ValueError(f"cannot create the run directory {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._lock.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLocked(f"another process is writing the run in {self.path}; wait for it or choose "
                                 f"another --out") from None
            raise
        self.mode = mode
        try:
            self._check_state()
        except BaseException:
            self.close()
            raise

    def _check_state(self) -> None:
        finished = self.finished
        present = [f for f in FILES if (self.path / f).exists()]
        if self.mode == "overwrite":
            for f in present:
                (self.path / f).unlink()
        elif self.mode == "new" and present:
            what = "a finished run" if finished else "an unfinished run"
            hint = "" if finished else " or --resume to continue it"
            raise ValueError(f"{self.path} holds {what}; pass --overwrite to replace it{hint}, or choose "
                             f"another --out")
        elif self.mode == "resume":
            if finished:
                raise ValueError(f"{self.path} holds a finished run; nothing to resume (--overwrite trains it again)")
            if not (self.path / "checkpoint.pt").exists():
                raise ValueError(f"{self.path} has no checkpoint to resume from; start the run without --resume")

    @property
    def finished(self) -> bool:
        path = self.path / "metrics.json"
        if not path.exists():
            return False
        try:
            return bool(read_json(path).get("finished", True))     # runs of the older format: written at the end
        except ValueError:
            return False

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write_config(self, config: dict) -> None:
        """Write config.json (``mode="resume"``: it must equal the saved one)."""
        if self.mode == "resume":
            saved = read_json(self.path / "config.json")
            if config_digest(self.canonical(saved)) != config_digest(self.canonical(config)):
                raise ValueError(f"{self.path}/config.json differs from the run being resumed; resume with "
                                 f"the same options (or --overwrite)")
            return
        write_atomic(self.path / "config.json", json.dumps(config, indent=1))

    @property
    def config(self) -> dict:
        return read_json(self.path / "config.json")

    @property
    def digest(self) -> str:
        """SHA-256 of config.json's content: what the weights and metrics record."""
        return config_digest(self.config)

    def save_model(self, model: nn.Module) -> None:
        save(model, self.path / "model.safetensors", metadata={"config_sha256": self.digest})

    def write_metrics(self, metrics: dict) -> None:
        write_atomic(self.path / "metrics.json", json.dumps(dict(metrics, config_sha256=self.digest), indent=1))

    def save_checkpoint(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".checkpoint.", suffix=".tmp")
        os.close(fd)
        try:
            os.chmod(tmp, FILE_MODE)
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path / "checkpoint.pt")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self) -> dict:
        return torch.load(self.path / "checkpoint.pt", weights_only=True)

    def remove_checkpoint(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / "checkpoint.pt").unlink()


def run_mode(resume: bool, overwrite: bool) -> str:
    """The ``RunDir`` mode of the ``--resume`` / ``--overwrite`` flags."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    return "resume" if resume else "overwrite" if overwrite else "new"


# ----------------------------------------------------------------------------- schedule and losses

@dataclass(frozen=True)
class Schedule:
    """Learning-rate multiplier per optimiser step: linear warm-up over ``warmup`` steps, then
    ``decay`` over the remaining ``total - warmup`` steps: "cosine" (half a cosine from 1 to
    ``floor``), "step" (x0.1 after each of ``STEP_MILESTONES``) or "none" (1)."""
    total: int
    warmup: int = 0
    decay: str = "none"
    floor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.decay == "cosine":
            return self.floor + (1 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.decay == "step":
            return 0.1 ** sum(t >= m for m in STEP_MILESTONES)
        return 1.0


def aux_loss(model: nn.Module, hardening: float = 0.0, balance: float = 0.0,
             hardening_mode: str = "reach") -> torch.Tensor | float:
    """The auxiliary losses of the last training forward: ``hardening · hardening_loss`` and
    ``load_balancing_loss(balance)`` (FFF, MoE) and ``node_balance_loss(balance)`` (NeuronTree),
    each over the feedforwards whose family records it (``Family.aux_losses``); 0 when no layer
    does or the weight is 0."""
    records = {name for m in model.modules() if (fam := family_of(m)) is not None for name in fam.aux_losses}
    loss = 0.0
    if hardening > 0 and "hardening" in records:
        loss = loss + hardening * hardening_loss(model, hardening_mode)
    if balance > 0 and "balance" in records:
        loss = loss + load_balancing_loss(model, balance)
    if balance > 0 and "node_balance" in records:
        loss = loss + node_balance_loss(model, balance)
    return loss


# ----------------------------------------------------------------------------- the loop

class Task(Protocol):
    """What a trainer provides to ``train_loop``: its data order, loss and metric."""

    def next_batch(self):
        """The next training batch (advances the data order)."""

    def loss(self, batch, step: int) -> tuple[torch.Tensor, float]:
        """(loss to minimise incl. auxiliary losses, prediction loss as a float) of one batch."""

    def evaluate(self, step: int) -> dict:
        """Validation record of the current model; must hold ``"score"`` (lower is better)."""

    def state_dict(self) -> dict:
        """The data-order state (restored by ``load_state_dict`` on resume)."""

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopResult:
    history: list = field(default_factory=list)   # one record per evaluation (the task's + step, seconds, loss, lr)
    best_step: int = 0
    best_score: float = math.inf
    step_times: list = field(default_factory=list)
    stopped: str | None = None                     # why training ended early (non-finite loss, patience)

    @property
    def train_seconds(self) -> float:
        return sum(self.step_times)

    @property
    def ms_per_step(self) -> float:
        """Median time of a training step, the first few (warm-up) excluded."""
        times = self.step_times[min(5, len(self.step_times) - 1):]
        return 1e3 * statistics.median(times) if times else math.nan


@contextlib.contextmanager
def _signals_noted(flag: list):
    """Within: SIGINT / SIGTERM append their number to ``flag`` instead of stopping the process."""
    handlers = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            handlers[s] = signal.signal(s, lambda signum, frame: flag.append(signum))
    except ValueError:                                  # not the main thread: signals stay as they are
        pass
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def train_loop(run: RunDir, model: nn.Module, opt: torch.optim.Optimizer, task: Task, steps: int,
               eval_at: Callable[[int], bool], schedule: Schedule, grad_clip: float = 0.0,
               patience: int = 0, checkpoint_every: int = 1, desc: str = "train",
               progress_bar: bool = True, postfix: Callable[[dict], dict] | None = None) -> LoopResult:
    """Train ``model`` for ``steps`` optimiser steps of ``task`` (resuming ``run``'s checkpoint
    if it was opened with ``mode="resume"``); evaluate after every step where ``eval_at(step)``
    (1-based) and at the last; keep the best score's weights in ``run`` (earliest on ties); stop
    after ``patience`` evaluations without improvement (0: never) or at a non-finite loss.
    The learning rate of a parameter group is ``group["initial_lr"] · schedule(step)``. Returns
    the history; the run's ``model.safetensors`` holds the selected weights.

    Timing counts the training steps only. SIGINT / SIGTERM: the step in progress finishes, a
    checkpoint is written, and ``Interrupted`` is raised."""
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    result, start, since_best, losses = LoopResult(), 0, 0, []
    if run.mode == "resume":
        state = run.load_checkpoint()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        task.load_state_dict(state["task"])
        torch.set_rng_state(state["torch_rng"])
        start, since_best, losses = state["step"], state["since_best"], state["losses"]
        result = LoopResult(**state["result"])

    def checkpoint(step: int) -> None:
        run.save_checkpoint({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "task": task.state_dict(), "torch_rng": torch.get_rng_state(),
                             "since_best": since_best, "losses": losses, "result": vars(result)})

    signals: list[int] = []
    evals = len(result.history)
    bar = progress(range(start, steps), desc=desc, disable=not progress_bar, leave=False, unit="step",
                   initial=start, total=steps)
    with _signals_noted(signals):
        for step in bar:
            lr = schedule(step)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr
            batch = task.next_batch()
            t0 = time.perf_counter()
            loss, pred = task.loss(batch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            result.step_times.append(time.perf_counter() - t0)
            losses.append(pred)
            done = step + 1
            if not math.isfinite(pred):
                result.stopped = f"training loss became {pred} at step {done}"
                break
            if eval_at(done) or done == steps:
                model.eval()
                record = task.evaluate(done)
                model.train()
                recent = losses[-(done - (result.history[-1]["step"] if result.history else 0)):]
                record = {"step": done, "seconds": result.train_seconds, "train_loss": sum(recent) / len(recent),
                          "lr": opt.param_groups[0]["lr"], **record}
                result.history.append(record)
                evals += 1
                if record["score"] < result.best_score:
                    result.best_score, result.best_step, since_best = record["score"], done, 0
                    run.save_model(model)
                else:
                    since_best += 1
                run.write_metrics({"history": result.history, "best_step": result.best_step, "finished": False})
                if postfix is not None:
                    bar.set_postfix(postfix(record), refresh=False)
                if patience and since_best >= patience:
                    result.stopped = f"no validation improvement in {patience} evaluations"
                    break
                if evals % checkpoint_every == 0 and done < steps:
                    checkpoint(done)
            if signals:
                checkpoint(done)
                name = signal.Signals(signals[0]).name
                raise Interrupted(f"{name} at step {done}/{steps}: checkpoint written to {run.path}; continue "
                                  f"with the same command and --resume", signals[0])
    if not result.best_step:
        raise FloatingPointError(f"{result.stopped or 'no evaluation'} before the first evaluation; lower the lr")
    return result


def select_best(run: RunDir, model: nn.Module) -> nn.Module:
    """``model`` with the run's selected (best on validation) weights, in eval mode."""
    return load_weights(run.path, run.config, model).eval()


def finish(run: RunDir, metrics: dict) -> None:
    """Write the final metrics (``"finished": true``) and drop the checkpoint: the run is complete."""
    run.write_metrics(dict(metrics, finished=True))
    run.remove_checkpoint()
