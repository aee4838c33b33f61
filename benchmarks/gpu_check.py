"""GPU check: the Triton kernels against cuBLAS dense layers and the "torch" backend, inference and
training, timed in one process, and their agreement on the GPU.

    python benchmarks/gpu_check.py [--device cuda] [--out DIR] [--repeats 10] [--warmup 2]
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --device cpu --out DIR    # the logic, tiny

Layers, in = out = 768: NeuronTree 1x11 (4095 neurons, 12 per row) and FFF depth 8 leaf 16 (width
4096, ``train_mode="hard_path"``: its eval is gated), each against a DenseFF of its width; GELU.

- ``eval``, float32 and bfloat16, batch 1 to 65536, no gradient: the dense layer (cuBLAS), each
  tree's layer forward on backends ``"torch"`` and ``"triton"`` (which picks its path by
  ``BLOCKED_FROM``), and the Triton row path and blocked path called directly;
- ``train``, float32, batch 4096 and 16384: one step (forward, MSE loss, backward, fused Adam step,
  zero_grad) of the dense layer and of each tree on ``"triton"`` and on ``"torch"``;
- ``agreement``: each Triton path's output against the ``"torch"`` backend in float32 on the same
  (for bfloat16: bf16-rounded) values, over the rows whose routing pre-activations all lie at least
  ``TIE`` from 0 (closer ones may route either way under rounding); max abs diff, the tolerance
  (``TOLERANCE`` times max(1, max |reference|)) and how many rows the Triton walk routed otherwise.

Times are wall-clock medians of interleaved calls (``fastff.apps.timing.median_times``, which reads
its clock after ``torch.cuda.synchronize()`` once CUDA is in use) after ``--warmup`` untimed
rounds; before them each candidate's first call at each batch is timed alone (``first_call_ms``:
Triton compiles there). ``dense_over_this``: the dense layer's ms of the same width, dtype and
batch over the candidate's. float32 matmuls run with torch's default (TF32 off; recorded).

Writes ``DIR/gpu_check.json`` (rewritten after every part, so a run cut short keeps what it
measured; a part that raises is recorded under ``errors`` and the others still run) and
``DIR/gpu_check.txt`` (the tables, also printed). Exit status 1 if a part failed or an agreement is
outside its tolerance.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import triton

import fastff
from fastff import FFF, DenseFF, NeuronTree
from fastff.apps.arguments import add_device, add_threads, apply_threads, check_device
from fastff.apps.timing import median_times
from fastff.kernels import BACKENDS, routing

T, V = BACKENDS["triton"], BACKENDS["torch"]
ACT = "gelu"
SIZES = {
    "full": dict(dim=768, tree_depth=11, fff_depth=8, leaf=16, eval_batches=[1, 16, 256, 4096, 16384, 65536],
                 train_batches=[4096, 16384], repeats=10, warmup=2),
    "smoke": dict(dim=16, tree_depth=3, fff_depth=3, leaf=2, eval_batches=[1, 8], train_batches=[8],
                  repeats=1, warmup=0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}    # max abs diff / max(1, max |reference|)
TIE = 1e-3


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- layers

def build_layers(cfg: dict, device: torch.device) -> dict[str, tuple[torch.nn.Module, DenseFF]]:
    """{label: (tree layer, DenseFF of its width)}, float32, eval mode, seeded."""
    torch.manual_seed(0)
    d = cfg["dim"]
    tree = NeuronTree(d, d, cfg["tree_depth"], activation=ACT)
    fff = FFF(d, d, cfg["fff_depth"], cfg["leaf"], activation=ACT, train_mode="hard_path")
    return {label: (layer.to(device).eval(), DenseFF(d, d, layer.training_width, ACT).to(device).eval())
            for label, layer in ((f"NeuronTree 1x{tree.depth}", tree), (f"FFF d{fff.depth} l{fff.leaf_width}", fff))}


def on_backend(layer: torch.nn.Module, backend: str) -> torch.nn.Module:
    """A copy of ``layer`` that runs on ``backend``."""
    twin = copy.deepcopy(layer)
    twin.backend = backend
    return twin


def kernel_weights(layer: torch.nn.Module) -> tuple:
    """The weight arguments of the layer's kernels: NeuronTree (w_in, b_in, w_out, b_out), FFF
    (node_w, node_b, w1, b1, w2, b2)."""
    if isinstance(layer, NeuronTree):
        return layer.w_in, layer.b_in, layer.w_out, layer.b_out
    return layer.node_w, layer.node_b, layer.w1, layer.b1, layer.w2, layer.b2


def triton_path(layer: torch.nn.Module, path: str):
    """The layer's eval on Triton's ``"rows"`` or ``"blocked"`` path: x (B, in) -> (B, out)."""
    w = kernel_weights(layer)
    if isinstance(layer, NeuronTree):
        fn = getattr(T, f"neuron_tree_{path}")
        return lambda x: fn(x, *w, ACT)
    fn = getattr(T, f"fff_hard_{path}")
    return lambda x: fn(x, *w, ACT, layer.gated)


def dense_name(dense: DenseFF) -> str:
    return f"dense w{dense.hidden}"


# ----------------------------------------------------------------------------- timing

def timed(fns: dict, baseline: dict[str, str], repeats: int, warmup: int, **fields) -> list[dict]:
    """Rows {**fields, candidate, baseline, ms, first_call_ms, dense_over_this} of the candidates
    ``fns`` (name -> zero-argument callable); ``baseline``: name -> its dense candidate's name."""
    first = {n: median_times({n: fn}, 1, warmup=0)[n] for n, fn in fns.items()}
    times = median_times(fns, repeats, warmup=warmup)
    return [{**fields, "candidate": n, "baseline": baseline[n], "ms": 1e3 * times[n], "first_call_ms": 1e3 * first[n],
             "dense_over_this": times[baseline[n]] / times[n]} for n in fns]


def eval_rows(layers: dict, dtype: str, batch: int, device, repeats: int, warmup: int) -> list[dict]:
    """Inference times of every candidate at one dtype and batch size (see the module doc)."""
    x = torch.randn(batch, next(iter(layers.values()))[0].in_features, device=device, dtype=DTYPES[dtype])
    fns, baseline = {}, {}
    for label, (layer, dense) in layers.items():
        group = {dense_name(dense): partial(dense, x),
                 **{f"{label} {b}": partial(on_backend(layer, b), x) for b in ("torch", "triton")},
                 **{f"{label} triton {path}": partial(triton_path(layer, path), x) for path in ("rows", "blocked")}}
        fns.update(group)
        baseline.update(dict.fromkeys(group, dense_name(dense)))
    with torch.inference_mode():
        return timed(fns, baseline, repeats, warmup, dtype=dtype, batch=batch)


def train_rows(layers: dict, batch: int, device, repeats: int, warmup: int) -> list[dict]:
    """float32 training-step times (forward, MSE, backward, fused Adam, zero_grad) at one batch size."""
    d = next(iter(layers.values()))[0].in_features
    x, target = torch.randn(batch, d, device=device), torch.randn(batch, d, device=device)
    modules, baseline = {}, {}
    for label, (layer, dense) in layers.items():
        group = {dense_name(dense): copy.deepcopy(dense).train(),
                 **{f"{label} {b}": on_backend(layer, b).train() for b in ("triton", "torch")}}
        modules.update(group)
        baseline.update(dict.fromkeys(group, dense_name(dense)))
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-4, fused=True) for n, m in modules.items()}

    def step(name: str) -> None:
        torch.nn.functional.mse_loss(modules[name](x), target).backward()
        opts[name].step()
        opts[name].zero_grad()

    return timed({n: partial(step, n) for n in modules}, baseline, repeats, warmup, dtype="float32", batch=batch)


# ----------------------------------------------------------------------------- agreement

def reference_routes(layer, x32, weights32):
    """The "torch" backend in float32: (y (B, out), route (B, ...) long, margin (B,) the smallest
    |routing pre-activation| on the row's path)."""
    if isinstance(layer, NeuronTree):
        y, nodes, pre = V.neuron_tree_paths(x32, *weights32, ACT, preactivations=True)
        return y, nodes.flatten(1), pre[..., :-1].abs().flatten(1).amin(1)
    y, _, leaf, _, logits = routing.fff_hard_path(V.fff_walk, V.fff_leaves, x32, *weights32, ACT,
                                                  hardened=not layer.gated)
    return y, leaf[:, None], logits.abs().amin(1)


def triton_routes(layer, x, weights) -> torch.Tensor:
    """The Triton walk's route of each row, as ``reference_routes`` gives it."""
    if isinstance(layer, NeuronTree):
        return T.neuron_tree_paths(x, *weights, ACT)[1].flatten(1)
    return routing.fff_hard_path(T.fff_walk, T.fff_leaves, x, *weights, ACT, hardened=not layer.gated)[2][:, None]


def agreement_rows(layers: dict, dtype: str, batch: int, device) -> list[dict]:
    """Each Triton path against the float32 "torch" backend on the same values (see the module doc)."""
    rows = []
    with torch.inference_mode():
        for label, (layer, _) in layers.items():
            x = torch.randn(batch, layer.in_features, device=device, dtype=DTYPES[dtype])
            weights = kernel_weights(layer)
            y_ref, route, margin = reference_routes(layer, x.float(), [w.float() for w in weights])
            keep = margin >= TIE
            scale = float(y_ref[keep].abs().max()) if keep.any() else 0.0
            rerouted = int((triton_routes(layer, x, weights) != route).any(1).sum())
            for path in ("rows", "blocked"):
                y = triton_path(layer, path)(x).float()
                diff = float((y - y_ref)[keep].abs().max()) if keep.any() else 0.0
                tol = TOLERANCE[dtype] * max(1.0, scale)
                rows.append({"layer": label, "path": path, "dtype": dtype, "batch": batch, "rows": batch,
                             "rows_compared": int(keep.sum()), "max_abs_diff": diff, "reference_max_abs": scale,
                             "tolerance": tol, "ok": diff <= tol, "routed_differently": rerouted})
    return rows


# ----------------------------------------------------------------------------- report

def _table(rows: list[dict], batches: list[int], cell) -> list[str]:
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    at = {(r["candidate"], r["batch"]): r for r in rows}
    lines = [f"{'candidate':28}" + "".join(f"{f'b={b}':>20}" for b in batches)]
    for n in names:
        lines.append(f"{n:28}" + "".join(f"{cell(at[n, b]) if (n, b) in at else '-':>20}" for b in batches))
    return lines


def report(result: dict) -> str:
    """The text tables of ``result`` (the JSON's content)."""
    m = result["meta"]
    out = [f"# gpu_check on {m['device_name']}: torch {m['torch']}, triton {m['triton']}; dim {m['sizes']['dim']}, "
           f"BLOCKED_FROM {m['blocked_from']}, TF32 matmul {m['tf32_matmul']}; {m['repeats']} repeats, "
           f"{m['warmup']} warm-up rounds{'; SMOKE (tiny sizes)' if m['smoke'] else ''}"]
    speed = lambda r: f"{r['ms']:.3f} ({r['dense_over_this']:.2f}x)"
    for part, dtypes, batches in (("eval", DTYPES, m["sizes"]["eval_batches"]),
                                  ("train", ["float32"], m["sizes"]["train_batches"])):
        for dtype in dtypes:
            rows = [r for r in result[part] if r["dtype"] == dtype]
            if rows:
                out += ["", f"## {part} {dtype}: ms (dense of equal width / this)", *_table(rows, batches, speed),
                        "", f"## {part} {dtype}: first call ms (Triton compiles here)",
                        *_table(rows, batches, lambda r: f"{r['first_call_ms']:.1f}")]
    if result["agreement"]:
        out += ["", f"## agreement with the float32 torch backend (rows with every routing |pre| >= {TIE}; "
                    "worst over batches)",
                f"{'layer':20} {'path':8} {'dtype':9} {'max abs diff':>13} {'tolerance':>10} {'compared':>9} "
                f"{'rerouted':>9}  ok"]
        groups = {}
        for r in result["agreement"]:
            groups.setdefault((r["layer"], r["path"], r["dtype"]), []).append(r)
        for (layer, path, dtype), rs in groups.items():
            out.append(f"{layer:20} {path:8} {dtype:9} {max(r['max_abs_diff'] for r in rs):>13.2e} "
                       f"{min(r['tolerance'] for r in rs):>10.1e} {sum(r['rows_compared'] for r in rs):>9} "
                       f"{sum(r['routed_differently'] for r in rs):>9}  {all(r['ok'] for r in rs)}")
    for e in result["errors"]:
        out.append(f"ERROR in {e['part']}: {e['error']}")
    out.append(f"\nok: {result['ok']}  ({result['meta']['seconds']:.0f} s)")
    return "\n".join(out)


def save(result: dict, out: Path, start: float) -> None:
    result["meta"]["seconds"] = time.perf_counter() - start
    result["ok"] = not result["errors"] and all(r["ok"] for r in result["agreement"])
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu_check.txt").write_text(report(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device(p, default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu",
                   help="output directory (default $OUT, else benchmarks/results/gpu)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: checks the script's logic (CPU: "
                                                        "TRITON_INTERPRET=1 --device cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per candidate (default 10; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; smoke 0)")
    add_threads(p)
    args = p.parse_args(argv)
    apply_threads(args)
    try:
        device = check_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs the Triton kernels only in Triton's interpreter: set TRITON_INTERPRET=1")
    cfg = SIZES["smoke" if args.smoke else "full"]
    repeats = cfg["repeats"] if args.repeats is None else args.repeats
    warmup = cfg["warmup"] if args.warmup is None else args.warmup
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    result = {"meta": {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                       else "cpu (Triton interpreter)", "torch": torch.__version__, "triton": triton.__version__,
                       "cuda": torch.version.cuda, "fastff": fastff.__version__, "blocked_from": T.BLOCKED_FROM,
                       "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "smoke": args.smoke,
                       "sizes": {k: v for k, v in cfg.items() if k not in ("repeats", "warmup")},
                       "repeats": repeats, "warmup": warmup, "tie": TIE, "tolerance": TOLERANCE},
              "eval": [], "train": [], "agreement": [], "errors": []}
    start = time.perf_counter()
    layers = build_layers(cfg, device)
    parts = []
    for dtype in DTYPES:
        cast = {label: tuple(copy.deepcopy(m).to(DTYPES[dtype]) for m in pair) for label, pair in layers.items()}
        for b in cfg["eval_batches"]:
            parts += [(f"eval {dtype} b={b}", "eval", partial(eval_rows, cast, dtype, b, device, repeats, warmup)),
                      (f"agreement {dtype} b={b}", "agreement", partial(agreement_rows, cast, dtype, b, device))]
    parts += [(f"train float32 b={b}", "train", partial(train_rows, layers, b, device, repeats, warmup))
              for b in cfg["train_batches"]]
    for name, key, fn in parts:
        log(name)
        try:
            result[key] += fn()
        except Exception as e:                  # recorded; the other parts still run
            traceback.print_exc()
            result["errors"].append({"part": name, "error": f"{type(e).__name__}: {e}"})
        save(result, out, start)
    print(report(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
