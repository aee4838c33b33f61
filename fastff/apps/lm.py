"""`fastff lm train|generate|bench|experiment`: character-level GPTs whose feedforwards are dense or
trees (``fastff.models.gpt``), trained on Shakespeare's complete works (or any text), served with
fastff's kernels, and timed against dense float32 and int8 models.

- ``train``: one run (``fastff.training.lm.fit``) -> a run directory; progress bar with tokens/s and
  validation loss; selection on validation only, test evaluated once.
- ``generate``: batch-1 decoding with the KV cache in eval mode; prints the text and tokens/s.
- ``bench``: end-to-end inference timing of untrained models at one shape (default GPT-2-small:
  12 layers, dim 768, 12 heads), prefill and per-token generation, every variant interleaved in
  one process (``timing.median_times``), with dense int8 (``quantize_dynamic``) baselines and the
  Amdahl ceiling (the same model without feedforwards). ``--train`` times training steps instead.
  ``--device cuda`` runs it on a GPU (the int8 variants, CPU-only, are skipped with a message).
- ``experiment``: the grid behind docs/lm.md (``fastff.apps.lm_experiment``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
from torch import nn

from ..data.text import CORPORA, load_corpus, split_text
from ..layers.families import FAMILIES, family
from ..models.gpt import GPT, GPTConfig, NoFFN
from ..models.quantize import quantize_int8
from ..training.lm import LMTrainConfig, fit, load_run
from ..training.run import read_json, run_mode
from .arguments import add_device, add_ffn_options, add_run_dir, add_threads, apply_threads, check_device, ffn_options
from .lm_grid import decode_seconds
from .timing import median_times

BENCH_FFNS = (*FAMILIES, *(f"{name}-int8" for name in FAMILIES), "no-ffn")
DEFAULT_BENCH_FFNS = ("dense", "dense-int8", "neuron-tree", "neuron-tree-int8", "fff", "moe", "no-ffn")
# the LM commands' defaults for options a family has (the rest are the family's own), for every
# family and per family; neuron-tree gate="path": the remedy that won the long regime's ablations
# (with the node-balance loss, LM_BALANCE)
LM_DEFAULTS = {"activation": "gelu", "train_mode": "hard_path"}
LM_FAMILY_DEFAULTS = {"neuron-tree": {"gate": "path"}}
# `lm train --balance` default for the families that record a balance loss (FFF / MoE load
# balancing, NeuronTree node balance); 0 for the others
LM_BALANCE = 0.01


# ----------------------------------------------------------------------------- arguments

def add_model_arguments(p: argparse.ArgumentParser, layers: int, dim: int, heads: int, context: int) -> None:
    """The model shape and feedforward options shared by ``train`` and ``bench``."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--dim", type=int, default=dim)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--context", type=int, default=context, help="block size (tokens)")
    p.add_argument("--width", type=int, default=None,
                   help="feedforward training width (default 4*dim; neuron-tree: from --depth/--trees)")
    add_ffn_options(p)


def ffn_fields(args, ffn: str, strict: bool = True) -> dict:
    """GPTConfig fields of the feedforward family ``ffn`` from the parsed arguments (``strict``:
    an option ``ffn`` does not take is an error)."""
    width = args.width or 4 * args.dim
    fam = family(ffn)
    return dict(ffn=fam.name, ffn_width=width,
                ffn_options=fam.resolve(width, ffn_options(args, ffn, strict),
                                        defaults=LM_DEFAULTS | LM_FAMILY_DEFAULTS.get(fam.name, {})))


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lm_command", required=True, metavar="{train,generate,inspect,bench,experiment}")

    t = sub.add_parser("train", help="train one GPT; selection on validation, test once")
    t.add_argument("--ffn", choices=sorted(FAMILIES), default="dense", help="feedforward family")
    add_model_arguments(t, layers=4, dim=256, heads=4, context=128)
    t.add_argument("--dropout", type=float, default=0.0)
    d = LMTrainConfig()
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--batch", type=int, default=d.batch_size, help="sequences per step")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--ffn-lr-mult", type=float, default=d.ffn_lr_mult, help="feedforward lr = lr * this")
    t.add_argument("--optimizer", choices=("adamw", "local-adam"), default=d.optimizer,
                   help="local-adam: each tree neuron steps once it saw --local-batch-size tokens (no weight decay)")
    t.add_argument("--local-batch-size", type=float, default=d.local_batch_size)
    t.add_argument("--warmup", type=int, default=d.warmup)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--hardening", type=float, default=d.hardening, help="FFF hardening-loss weight")
    t.add_argument("--balance", type=float, default=None,
                   help=f"FFF / MoE load-balancing alpha; NeuronTree node-balance alpha (default {LM_BALANCE} for "
                        "the families that record a balance loss, else 0)")
    t.add_argument("--eval-every", type=int, default=d.eval_every)
    t.add_argument("--eval-batches", type=int, default=d.eval_batches)
    t.add_argument("--capacity-tokens", type=int, default=d.capacity_tokens,
                   help="validation tokens the capacity diagnostics (see `lm inspect`) count per evaluation; 0 = off")
    t.add_argument("--checkpoint-every", type=int, default=1, help="evaluations between resumable checkpoints")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--text", default=None,
                   help=f"corpus: {' or '.join(CORPORA)} (default shakespeare), or a UTF-8 file / directory of .txt files")
    add_threads(t)
    add_run_dir(t)
    t.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="continue a prompt with a trained run (batch 1, KV cache)")
    g.add_argument("run", help="run directory written by `fastff lm train`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--tokens", type=int, default=200, help="characters to generate")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None, dest="sample_top_k", help="sample from the k most likely")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sliding", action="store_true",
                   help="allow prompt + tokens beyond the context: re-prefill the last context/2 tokens when full")
    add_threads(g)
    g.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="capacity diagnostics of a run: units reached per level, dead units, "
                                       "routing balance, over training")
    i.add_argument("run", help="run directory written by `fastff lm train`")
    i.add_argument("--step", type=int, default=None, help="the evaluation to show (default: the selected one)")
    i.add_argument("--plot", metavar="PNG", help="plot dead units and deepest-level reach per layer vs step")
    i.add_argument("--json", action="store_true", help="print the evaluation's diagnostics as JSON")

    b = sub.add_parser("bench", help="end-to-end inference (or --train step) timing vs dense and int8")
    add_model_arguments(b, layers=12, dim=768, heads=12, context=1024)
    b.set_defaults(ffn_option_depth=11)            # UltraFastBERT's 1x11: 4095 neurons, 12 per token
    b.add_argument("--vocab", type=int, default=84, help="vocabulary size (84 = the Shakespeare characters)")
    b.add_argument("--ffns", default=",".join(DEFAULT_BENCH_FFNS),
                   help=f"comma-separated subset of {','.join(BENCH_FFNS)} (NAME-int8: int8 attention and head; "
                        f"dense-int8: the dense feedforwards too)")
    b.add_argument("--batches", default="1,8", help="sequences per call")
    b.add_argument("--prompt-tokens", type=int, default=512, help="prefill length")
    b.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per timed generation call")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--train", action="store_true",
                   help="time training steps (fwd + bwd + AdamW) at --batches sequences of --context tokens")
    add_threads(b)
    add_device(b)
    b.add_argument("--json", action="store_true", help="JSON Lines, one object per row")

    e = sub.add_parser("experiment", help="the grid behind docs/lm.md")
    from .lm_experiment import add_arguments as add_experiment_arguments
    add_experiment_arguments(e)


def run(args) -> int:
    apply_threads(args)
    if args.lm_command == "train":
        return run_train(args)
    if args.lm_command == "generate":
        return run_generate(args)
    if args.lm_command == "bench":
        return run_bench(args)
    if args.lm_command == "inspect":
        return run_inspect(args)
    from .lm_experiment import run as run_experiment
    return run_experiment(args)


# ----------------------------------------------------------------------------- train / generate

def lm_balance(args) -> float:
    """``--balance``, or ``LM_BALANCE`` for a family that records a balance loss, else 0."""
    if args.balance is not None:
        return args.balance
    return LM_BALANCE if {"balance", "node_balance"} & set(family(args.ffn).aux_losses) else 0.0


def run_train(args) -> int:
    text = load_corpus(args.text)
    splits = split_text(text)
    model_cfg = GPTConfig(vocab_size=len(splits.vocab), context=args.context, layers=args.layers, heads=args.heads,
                          dim=args.dim, dropout=args.dropout, **ffn_fields(args, args.ffn))
    local = args.optimizer == "local-adam"
    cfg = LMTrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, ffn_lr_mult=args.ffn_lr_mult,
                        optimizer=args.optimizer, local_batch_size=args.local_batch_size,
                        warmup=min(args.warmup, args.steps - 1), weight_decay=0.0 if local else args.weight_decay,
                        hardening=args.hardening, balance=lm_balance(args), eval_every=args.eval_every,
                        eval_batches=args.eval_batches, capacity_tokens=args.capacity_tokens, seed=args.seed)
    source = args.text or "shakespeare"
    source = source if source in CORPORA else os.path.abspath(source)
    corpus = f"{source} sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    model, result = fit(model_cfg, cfg, splits, args.out, run_mode(args.resume, args.overwrite), text=corpus,
                        progress=not args.quiet, checkpoint_every=args.checkpoint_every)
    summary = {"run": str(args.out), "ffn": model_cfg.ffn, "val_loss": result.val_loss, "test_loss": result.test_loss,
               "best_step": result.best_step, "steps": cfg.steps, "train_seconds": result.train_seconds,
               "ms_per_step": result.ms_per_step, "tokens_per_s": result.tokens_per_s,
               "neurons_per_token": result.ffn_neurons_per_token // model_cfg.layers,
               "training_width": result.ffn_training_width // model_cfg.layers, "stopped": result.stopped}
    if args.json:
        print(json.dumps(summary))
    else:
        if result.stopped:
            print(f"warning: {result.stopped}; the run keeps the best model before it", file=sys.stderr)
        print(f"{args.out}: val {result.val_loss:.4f} (step {result.best_step}/{cfg.steps})  test {result.test_loss:.4f}  "
              f"{result.ms_per_step:.0f} ms/step  {result.tokens_per_s:.0f} tokens/s  "
              f"FFN neurons/token {summary['neurons_per_token']} of {summary['training_width']}")
    return 0


def run_generate(args) -> int:
    model, vocab, _ = load_run(args.run)
    if not args.prompt:
        raise ValueError("--prompt is empty; give at least one character to continue")
    idx = vocab.encode(args.prompt)[None]                               # (1, T0); unknown characters raise
    context, n = model.cfg.context, idx.shape[1]
    if n > context:
        raise ValueError(f"--prompt has {n} characters, more than the model's context of {context}; shorten it")
    if n + args.tokens > context and not args.sliding:
        raise ValueError(f"--prompt of {n} characters + --tokens {args.tokens} exceed the model's context of "
                         f"{context}; generate fewer tokens or pass --sliding to slide the context window")
    model.generate(idx, 1, generator=torch.Generator().manual_seed(args.seed), sliding=args.sliding)  # warm-up
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.sample_top_k, generator=gen,
                         sliding=args.sliding)
    seconds = time.perf_counter() - start
    text = vocab.decode(out[0])
    if args.json:
        print(json.dumps({"text": text, "tokens": args.tokens, "seconds": seconds,
                          "tokens_per_s": args.tokens / seconds}))
    else:
        print(text)
        print(f"\n[{args.tokens} tokens in {seconds:.2f} s: {args.tokens / seconds:.0f} tokens/s, batch 1, "
              f"KV cache, {torch.get_num_threads()} threads]", file=sys.stderr)
    return 0


def run_inspect(args) -> int:
    load_run(args.run)                                       # a complete, consistent run directory
    history = read_json(os.path.join(args.run, "metrics.json"))["history"]
    with_capacity = [r for r in history if r.get("capacity")]
    if not with_capacity:
        raise ValueError(f"{args.run} has no capacity diagnostics: its feedforwards do not route, or it was trained "
                         f"with --capacity-tokens 0 (or before fastff recorded them)")
    metrics = read_json(os.path.join(args.run, "metrics.json"))
    step = metrics.get("best_step") if args.step is None else args.step
    record = next((r for r in with_capacity if r["step"] == step), None)
    if record is None:
        raise ValueError(f"--step {step}: {args.run} has diagnostics at steps {[r['step'] for r in with_capacity]}")
    if args.json:
        print(json.dumps({"step": step, "capacity": record["capacity"]}))
    else:
        print(f"# {args.run}, step {step}: per layer, units reached per level (root first) on "
              f"{record['capacity'][0]['rows']} validation tokens")
        print(f"{'layer':>5} {'family':12} {'deepest':>8} {'dead':>6} {'root right':>10}  reached per level")
        for c in record["capacity"]:
            right = "-" if c.get("root_right") is None else f"{c['root_right']:.2f}"
            levels = " ".join(f"{lv['reached']:.2f}" for lv in c["levels"])
            print(f"{c['layer']:>5} {c['family']:12} {c['deepest_reached']:>8.2f} {c['dead']:>6.2f} {right:>10}  {levels}")
    if args.plot:
        plot_capacity(with_capacity, args.plot, title=os.path.basename(os.path.normpath(args.run)))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def plot_capacity(history: list[dict], path: str, title: str) -> None:
    """Dead-unit fraction (the auto-pruning curve) and deepest-level reach vs step, one line per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in history]
    for layer in range(len(history[-1]["capacity"])):
        for ax, key in zip(axes, ("dead", "deepest_reached")):
            ax.plot(steps, [r["capacity"][layer][key] for r in history], marker=".", label=f"layer {layer}")
    axes[0].set(xlabel="step", ylabel="dead units (fraction)", title=f"{title}: units never reached", ylim=(0, 1))
    axes[1].set(xlabel="step", ylabel="deepest level reached (fraction)", title="deepest level reached", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- bench

def bench_models(args, names: list[str], device: torch.device) -> dict[str, nn.Module]:
    """The untrained models of ``fastff lm bench`` on ``device``, eval mode, one per variant name
    (int8 variants: CPU only)."""
    base = dict(vocab_size=args.vocab, context=args.context, layers=args.layers, heads=args.heads, dim=args.dim)
    built = {}
    for name in names:
        kind = name.removesuffix("-int8")
        torch.manual_seed(0)
        model = GPT(GPTConfig(**base, **ffn_fields(args, "dense" if kind == "no-ffn" else kind, strict=False)))
        model = model.to(device).eval()
        if kind == "no-ffn":
            for block in model.blocks:
                block.ffn = NoFFN()
        # int8: attention, head and every feedforward int8 quantization may convert (the dense ones)
        built[name] = quantize_int8(model, feedforwards=True) if name.endswith("-int8") else model
    return built


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def bench_rows(args) -> list[dict]:
    """Prefill and per-token generation rows of every variant (or training-step rows with --train)."""
    names = [n.strip() for n in args.ffns.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCH_FFNS))
    if unknown or not names:
        raise ValueError(f"--ffns must name some of {', '.join(BENCH_FFNS)}, got {args.ffns!r}")
    if not args.train and args.prompt_tokens + args.new_tokens > args.context:
        raise ValueError(f"--prompt-tokens + --new-tokens must fit in --context {args.context}")
    device = check_device(args.device)
    log = lambda msg: print(f"[lm bench] {msg}", file=sys.stderr, flush=True)
    int8 = [n for n in names if n.endswith("-int8")]
    if int8 and device.type != "cpu":
        names = [n for n in names if n not in int8]
        if not names:
            raise ValueError(f"--ffns {args.ffns}: the int8 variants run on CPU only (torch.ao quantize_dynamic); "
                             f"name others for --device {args.device}")
        log(f"skipping {', '.join(int8)}: int8 (torch.ao quantize_dynamic) runs on CPU only")
    models = bench_models(args, names, device)
    rows = []
    for batch in _ints(args.batches):
        gen = torch.Generator().manual_seed(batch)
        if args.train:
            rows += _train_rows(models, batch, args, gen, log, device)
            continue
        prompt = torch.randint(args.vocab, (batch, args.prompt_tokens), generator=gen).to(device)
        log(f"prefill {batch}x{args.prompt_tokens}: {', '.join(models)}")
        with torch.inference_mode():
            times = median_times({n: (lambda m=m: m.forward_step(prompt, m.new_cache(batch))) for n, m in models.items()},
                                 args.repeats, warmup=1)
        rows += _rows(times, "prefill", batch, batch * args.prompt_tokens, device)
        log(f"generate {batch}x{args.new_tokens} after {args.prompt_tokens}")
        rows += _rows(decode_seconds(models, prompt, args.new_tokens, args.repeats, gen), "generate", batch, batch,
                      device)
    return rows



def _train_rows(models: dict, batch: int, args, gen, log, device: torch.device) -> list[dict]:
    """Median fwd + bwd + AdamW step time of each (float32) variant on batch x context tokens."""
    trainable = {n: m.train() for n, m in models.items() if not n.endswith("-int8")}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in trainable.items()}
    x = torch.randint(args.vocab, (batch, args.context), generator=gen).to(device)
    y = torch.randint(args.vocab, (batch, args.context), generator=gen).to(device)

    def step(name):
        _, loss = trainable[name](x, y)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    log(f"train step {batch}x{args.context}: {', '.join(trainable)}")
    times = median_times({n: (lambda n=n: step(n)) for n in trainable}, args.repeats, warmup=2)
    return _rows(times, "train", batch, batch * args.context, device)


def _rows(times: dict[str, float], phase: str, batch: int, tokens: int, device: torch.device) -> list[dict]:
    dense = times.get("dense")
    return [{"ffn": name, "phase": phase, "batch": batch, "tokens": tokens, "ms": 1e3 * t,
             "tokens_per_s": tokens / t, "speedup_vs_dense": None if dense is None else dense / t,
             "threads": torch.get_num_threads(), "device": str(device)} for name, t in times.items()]


def run_bench(args) -> int:
    rows = bench_rows(args)
    if args.json:
        print("\n".join(json.dumps(r) for r in rows))
        return 0
    shape = (f"{args.layers} layers, dim {args.dim}, {args.heads} heads, vocab {args.vocab}, feedforward "
             f"width {args.width or 4 * args.dim}")
    device = torch.device(args.device)             # checked by bench_rows
    where = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    print(f"# {shape}; {where}threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'ffn':18} {'phase':9} {'batch':>5} {'tokens':>7} {'ms':>10} {'tokens/s':>10} {'vs dense':>9}")
    for r in rows:
        x = "-" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"
        print(f"{r['ffn']:18} {r['phase']:9} {r['batch']:>5} {r['tokens']:>7} {r['ms']:>10.2f} "
              f"{r['tokens_per_s']:>10.0f} {x:>9}")
    return 0
