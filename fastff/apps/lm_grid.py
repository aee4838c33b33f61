"""The machinery of the language-model grids (``lm_experiment``: the short regime,
``lm_capacity``: the long one): a ``Grid`` trains named variants into run directories of the
run core, skipping finished runs and resuming interrupted ones; ``load_runs`` reads them back."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..models.gpt import GPT, GPTConfig, NoFFN
from ..training.lm import LMTrainConfig, fit
from ..training.run import RunLocked, read_json
from .timing import median_times

LOCK_POLL_SECONDS = 30   # how often a grid process looks again at a run another one is training


class Grid:
    """Runs one stage after another in ``root``, skipping finished runs and resuming interrupted
    ones. ``variant_of(name) -> (family, GPTConfig fields, LMTrainConfig overrides)``;
    ``evals``: evaluations per run."""

    def __init__(self, args, splits, variant_of, evals: int = 10, text: str = "shakespeare"):
        self.args, self.splits, self.root = args, splits, Path(args.runs)
        self.variant_of, self.evals, self.text = variant_of, evals, text
        self.root.mkdir(parents=True, exist_ok=True)

    def model_cfg(self, fields: dict) -> GPTConfig:
        return GPTConfig(vocab_size=len(self.splits.vocab), **{k: getattr(self.args, k) for k in ('layers', 'dim', 'heads', 'context')}, **fields)

    def train(self, run_name: str, variant: str, steps: int, seed: int, lr: float) -> dict:
        """Train (or read back) one run; returns its metrics. A run another process is training
        (several grid processes share a root) is waited for, then read back."""
        while True:
            metrics = self.root / run_name / "metrics.json"
            if metrics.exists() and read_json(metrics).get("finished", True):     # older runs: written when finished
                return read_json(metrics)
            try:
                return self._train(run_name, variant, steps, seed, lr)
            except RunLocked:
                print(f"{run_name}: another process is training it; waiting", flush=True)
                time.sleep(LOCK_POLL_SECONDS)

    def _train(self, run_name: str, variant: str, steps: int, seed: int, lr: float) -> dict:
        out = self.root / run_name
        family, fields, overrides = self.variant_of(variant)
        options = dict(lr=lr, warmup=min(100, steps // 10), eval_every=max(1, steps // self.evals)) | overrides
        cfg = LMTrainConfig(steps=steps, batch_size=self.args.batch, seed=seed, **options)
        mode = "resume" if (out / "checkpoint.pt").exists() else "overwrite"     # an unfinished run continues
        out.mkdir(parents=True, exist_ok=True)
        (out / "variant.json").write_text(json.dumps({"variant": variant, "family": family, "stage": run_name.split("_")[0]}))
        _, result = fit(self.model_cfg(fields), cfg, self.splits, out, mode, text=self.text,
                        progress=not self.args.quiet)
        print(f"{run_name}: val {result.val_loss:.4f} test {result.test_loss:.4f} ({result.train_seconds:.0f} s, "
              f"{result.ms_per_step:.0f} ms/step)", flush=True)
        return json.loads((out / "metrics.json").read_text())

    def step_times(self, names: list[str]) -> dict[str, float]:
        """Median training-step seconds of the variants ``names`` and of the model without feedforwards,
        interleaved in one process (cached in steptime.json, which must then hold every name)."""
        path = self.root / "steptime.json"
        if path.exists():
            seconds = json.loads(path.read_text())["seconds"]
            missing = sorted(set(names) - set(seconds))
            if missing:
                raise ValueError(f"{path} has no step time for {', '.join(missing)}: delete it to measure every "
                                 "variant again (stage 'steptime')")
            return seconds
        models, opts = {}, {}
        for name in [*names, "no-ffn"]:
            torch.manual_seed(0)
            model = GPT(self.model_cfg(self.variant_of(names[0] if name == "no-ffn" else name)[1])).train()
            if name == "no-ffn":
                for block in model.blocks:
                    block.ffn = NoFFN()
            models[name] = model
            opts[name] = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(len(self.splits.vocab), (self.args.batch, self.args.context),
                          generator=torch.Generator().manual_seed(0))

        def step(name):
            _, loss = models[name](x, x)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()

        seconds = median_times({n: (lambda n=n: step(n)) for n in models}, 7, warmup=2)
        path.write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                                    "load_average": os.getloadavg()[0], "batch": self.args.batch}, indent=1))
        return seconds


def decode_seconds(models: dict[str, GPT], prompt: torch.Tensor, new_tokens: int, repeats: int,
                   gen: torch.Generator) -> dict[str, float]:
    """Median seconds per decoding step (one token per sequence, KV cache) of each model, after an
    untimed prefill of ``prompt`` (batch, tokens; on the models' device), every model interleaved
    (``median_times``)."""
    batch = len(prompt)
    vocab = min(m.cfg.vocab_size for m in models.values())
    caches, nxt = {}, torch.randint(vocab, (batch, 1), generator=gen).to(prompt.device)

    def prefill(name, model):
        caches[name] = model.new_cache(batch)
        model.forward_step(prompt, caches[name])

    def decode(name, model):
        for _ in range(new_tokens):
            model.forward_step(nxt, caches[name])

    with torch.inference_mode():
        times = median_times({n: (lambda n=n, m=m: decode(n, m)) for n, m in models.items()}, repeats,
                             warmup=1, setup={n: (lambda n=n, m=m: prefill(n, m)) for n, m in models.items()})
    return {n: t / new_tokens for n, t in times.items()}


def load_runs(root: Path) -> list[dict]:
    """Every finished run under ``root``: variant, stage, seed, config and metrics."""
    runs = []
    for d in sorted(root.iterdir()):
        if not (d / "metrics.json").exists() or not read_json(d / "metrics.json").get("finished", True):
            continue
        info = json.loads((d / "variant.json").read_text())
        runs.append({"name": d.name, "seed": int(d.name.rsplit("_s", 1)[1]), **info,
                     "config": json.loads((d / "config.json").read_text()),
                     "metrics": json.loads((d / "metrics.json").read_text())})
    return runs


