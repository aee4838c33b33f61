"""`fastff bench`: inference time of a feedforward family (FFF, NeuronTree, any registered one)
against dense and MoE baselines.

Everything is timed in one process, interleaved (each repeat runs every candidate once, in
turn), after warm-up, under ``torch.inference_mode()``; the reported time is the median. For
batches up to ``REWARM_MAX_BATCH`` each timed call directly follows an untimed call of the same
candidate (steady-state caches for every candidate alike).
Candidates (``backend`` field of a row):

- ``dense``: ``fastff.DenseFF`` (nn.Linear -> GELU -> nn.Linear) of the layer's training width;
- ``layer``: the layer itself, for families without inference backends;
- ``torch``: the layer with ``backend="torch"`` (vectorised gathers);
- ``cpu``: the layer with ``backend="cpu"`` (numba kernels; full module call);
- ``cpu-kernel``: ``fastff.kernels.cpu`` called directly on the 2-D input (no module overhead);
- ``cpu-numba``: just the numba part (``cpu.fff_run`` / ``cpu.neuron_tree_run``) on numpy views
  prepared once and a preallocated output: the kernels without the torch glue;
- ``moe-top1`` / ``moe-top2``: ``fastff.MoE`` with ``MOE_EXPERTS`` experts of the same total width;
- ``reference``: the per-sample Python loop (``fastff.kernels.reference``, the original
  fastfeedforward eval), only for batches up to ``--reference-max-batch``.

Each row also carries the work per row (weight + activation bytes touched, FLOPs, no reuse
across rows assumed for the routed layers) and the achieved GB/s and GFLOP/s, to compare with
the machine's copy bandwidth and GEMM peak measured by ``machine_limits``; and the bound the
hardware sets on the call (``bound_ms``, ``pct_of_bound``): the larger of the memory bound
(``unique_bytes`` — the distinct weight bytes the batch touches, expected under uniform
routing, plus its input and output — at copy bandwidth) and the compute bound (FLOPs at the
measured GEMM peak); ``bound`` says which one applies.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field

import torch

from .. import kernels
from .._checks import check_int
from ..functional import activation_code
from ..layers.families import FAMILIES, family, make_ffn
from .arguments import add_ffn_options, add_threads, apply_threads, ffn_options
from .timing import best_time, median_times

MOE_EXPERTS = 16
FIELDS = ("layer", "batch", "depth", "backend", "ms", "speedup_vs_dense", "width", "dim", "threads",
          "bytes_per_row", "flops_per_row", "gb_s", "gflop_s", "pct_copy_bw", "pct_gemm", "bound_ms",
          "pct_of_bound", "bound")


# the bench's defaults for options a family has (the rest are the family's own)
BENCH_DEFAULTS = {"activation": "gelu", "leaf": 16}


@dataclass
class Spec:
    """A layer configuration: family ``layer``, input = output width ``dim``, at ``depth`` (the
    family's ``sized``) or at training width ``width``, with the family's ``options`` (missing
    ones from ``BENCH_DEFAULTS``, then the family's defaults)."""
    layer: str
    depth: int | None = None
    dim: int = 768
    options: dict = field(default_factory=dict)
    width: int | None = None

    def __post_init__(self):
        fam = family(self.layer)
        options = {k: v for k, v in BENCH_DEFAULTS.items() if fam.option(k) is not None} | self.options
        if self.width is None:
            if self.depth is None or fam.sized is None:
                raise ValueError(f"bench {fam.name}: give a --width (it has no depth to size it by)"
                                 if fam.sized is None else "bench: give a --depth or a --width")
            self.width, options = fam.sized(self.depth, options)
        self.options = fam.resolve(self.width, options)
        self.family = fam

    def build(self, backend: str | None = None):
        """The layer under test (eval mode, float32; on ``backend`` where its family has backends)."""
        runtime = {} if backend is None else {"backend": backend}
        return self.family.build(self.dim, self.dim, self.width, self.options, **runtime).eval()

    @property
    def training_width(self) -> int:
        return self.family.geometry(self.width, self.options).training_width

    def work_per_row(self) -> tuple[int | None, int | None]:
        """(bytes, FLOPs) one row touches in hard inference, float32, no reuse across rows:
        the weights on its path, its input row and its output row (None, None: unknown)."""
        if self.family.cost is None:
            return None, None
        weights, flops, _ = self.family.cost(self.dim, self.options, self.width)
        return (weights + 2 * self.dim) * 4, flops

    def unique_bytes(self, batch: int) -> float | None:
        """Distinct bytes a batch of hard inference must move at least (float32): every weight
        row some row of the batch touches, once — expected under uniform routing — plus the
        input and output (None: unknown)."""
        if self.family.cost is None:
            return None
        return 4 * (self.family.cost(self.dim, self.options, self.width)[2](batch) + 2 * self.dim * batch)


def parse_batches(text: str) -> list[int]:
    """'1,64,4096' -> [1, 64, 4096]; every entry a positive int."""
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch must be comma-separated positive integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch must be comma-separated positive integers, got {text!r}")
    return batches


def machine_limits(seconds: float = 1.0) -> dict:
    """Measured copy bandwidth (GB/s, read + write of a 256 MB float32 buffer) and float32 GEMM
    rate (GFLOP/s, 2048^3 torch.mm), best of repeats within about ``seconds``."""
    src = torch.rand(64 << 20)
    dst = torch.empty_like(src)
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    out = torch.empty(2048, 2048)
    copy_t, gemm_t = best_time(lambda: dst.copy_(src), seconds / 2), best_time(lambda: torch.mm(a, b, out=out), seconds / 2)
    return {"copy_gb_s": 2 * src.numel() * 4 / copy_t / 1e9, "gemm_gflop_s": 2 * 2048 ** 3 / gemm_t / 1e9}


def add_limits(rows: list[dict], limits: dict | None) -> list[dict]:
    """Set pct_copy_bw / pct_gemm (achieved GB/s and GFLOP/s as % of the machine limits) and
    the bound: bound_ms = max(unique_bytes / copy bandwidth, batch FLOPs / GEMM peak), bound =
    "memory" | "compute" (the larger), pct_of_bound = 100 · bound_ms / ms."""
    for r in rows:
        for key, achieved, limit in (("pct_copy_bw", "gb_s", "copy_gb_s"), ("pct_gemm", "gflop_s", "gemm_gflop_s")):
            ok = limits is not None and r.get(achieved) is not None
            r[key] = 100 * r[achieved] / limits[limit] if ok else None
        r["bound_ms"] = r["pct_of_bound"] = r["bound"] = None
        if limits is not None and r.get("unique_bytes") is not None and r.get("flops_per_row") is not None:
            memory = 1e3 * r["unique_bytes"] / (limits["copy_gb_s"] * 1e9)
            compute = 1e3 * r["flops_per_row"] * r["batch"] / (limits["gemm_gflop_s"] * 1e9)
            r["bound_ms"], r["bound"] = max(memory, compute), "memory" if memory >= compute else "compute"
            r["pct_of_bound"] = 100 * r["bound_ms"] / r["ms"]
    return rows


def candidates(spec: Spec, include: set[str]) -> dict:
    """backend name -> callable(x) for every candidate in ``include``."""
    torch.manual_seed(0)
    out = {}
    fam, act = spec.family, spec.options.get("activation", "gelu")
    if "dense" in include:
        out["dense"] = make_ffn("dense", spec.dim, spec.dim, spec.training_width, activation=act).eval()
    if not fam.backends and "layer" in include:
        out["layer"] = spec.build()
    for backend in ("torch", "cpu", "reference"):
        if fam.backends and backend in include:
            out[backend] = spec.build(backend)
    # cpu-kernel and cpu-numba get layers of their own: candidates that shared weights would warm
    # each other's caches (after the dense baseline evicts them, whichever ran second would win).
    if fam.cpu_kernel is not None and "cpu-kernel" in include:
        kernel, _, w = fam.cpu_kernel(spec.build("cpu"))
        out["cpu-kernel"] = lambda x: kernel(x, *w, act)
    if fam.cpu_kernel is not None and "cpu-numba" in include:
        _, run, w = fam.cpu_kernel(spec.build("cpu"))
        out["cpu-numba"] = _numba_call(run, kernels.cpu.weights_np(*w), activation_code(act), spec.dim)
    for k in (1, 2):
        if f"moe-top{k}" in include:
            out[f"moe-top{k}"] = make_ffn("moe", spec.dim, spec.dim, MOE_EXPERTS * -(-spec.training_width // MOE_EXPERTS),
                                          leaf=-(-spec.training_width // MOE_EXPERTS), top_k=k, activation=act).eval()
    return out


def _numba_call(run, weights, code: int, out_features: int):
    """fn(x) running only the numba part on x's numpy view into an output buffer kept per shape."""
    buffers = {}

    def call(x):
        xa = x.numpy()
        out = buffers.get(xa.shape[0])
        if out is None:
            out = buffers[xa.shape[0]] = torch.empty(xa.shape[0], out_features).numpy()
        run(xa, weights, code, out)
        return out
    return call


REWARM_MAX_BATCH = 1024  # above this a call is long enough that its cache state on entry is noise


def repeats_for(batch: int, base: int) -> int:
    """Fewer repeats for big batches (the dense baseline is slow there): ``base`` up to batch
    256, then proportionally fewer, at least 5 (a median of 3 let one slow call through) and
    at most ``base``."""
    return min(base, max(5, base * 256 // max(1, batch)))


def bench_rows(spec: Spec, batches: list[int], repeats: int = 20, warmup: int = 2,
               include: tuple[str, ...] = ("dense", "layer", "torch", "cpu", "cpu-kernel", "cpu-numba", "moe-top1",
                                           "moe-top2", "reference"),
               reference_max_batch: int = 64, log=None) -> list[dict]:
    """Time every candidate at every batch size. Returns rows with the fields in FIELDS."""
    fns = candidates(spec, set(include))
    threads = torch.get_num_threads()
    bytes_row, flops_row = spec.work_per_row()
    width = spec.training_width
    dense_bytes_row = 4 * 2 * spec.dim
    dense_flops_row = 4 * spec.dim * width
    dense_weight_bytes = 4 * (2 * spec.dim * width + width + spec.dim)
    rows = []
    for batch in batches:
        active = {k: f for k, f in fns.items() if k != "reference" or batch <= reference_max_batch}
        reps = {k: min(3, repeats) if k == "reference" else repeats_for(batch, repeats) for k in active}
        x = torch.randn(batch, spec.dim, generator=torch.Generator().manual_seed(batch))
        report = None
        if log:
            log(f"batch {batch}: timing {', '.join(active)} x{max(reps.values())}")
            report = lambda r, n: log(f"  batch {batch}: round {r}/{n}") if r % max(1, n // 4) == 0 else None
        with torch.inference_mode():
            med = median_times({k: (lambda f=f: f(x)) for k, f in active.items()}, reps, warmup,
                               rewarm=batch <= REWARM_MAX_BATCH, progress=report)
        for name, sec in med.items():
            if name == "dense":
                moved, flops = dense_weight_bytes + batch * dense_bytes_row, batch * dense_flops_row
                unique = moved
            elif name.startswith("moe") or bytes_row is None:
                moved = flops = unique = None
            else:
                moved, flops, unique = batch * bytes_row, batch * flops_row, spec.unique_bytes(batch)
            rows.append({
                "layer": spec.layer, "batch": batch, "depth": spec.depth, "backend": name,
                "ms": sec * 1e3, "speedup_vs_dense": med["dense"] / sec if "dense" in med else None,
                "width": width, "dim": spec.dim, "threads": threads,
                "bytes_per_row": None if moved is None else moved / batch,
                "flops_per_row": None if flops is None else flops / batch,
                "gb_s": None if moved is None else moved / sec / 1e9,
                "gflop_s": None if flops is None else flops / sec / 1e9,
                "unique_bytes": unique,
            })
    return rows


def depth_sweep(layer: str, depths, dim: int, batch: int, repeats: int, log=None, options=None) -> list[dict]:
    """Rows (dense / torch / cpu-kernel / cpu-numba) for each depth at one batch size, for the scaling plot."""
    rows = []
    for depth in depths:
        if log:
            log(f"depth {depth}")
        rows += bench_rows(Spec(layer, depth, dim, dict(options or {})), [batch], repeats=repeats,
                           include=("dense", "layer", "torch", "cpu-kernel", "cpu-numba"))
    return rows


def plot_depth(rows: list[dict], path: str) -> None:
    """Log-log plot of ms vs training width, one line per backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = sorted((r["width"], r["ms"], r["depth"]) for r in rows if r["backend"] == backend)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        if backend == "cpu-kernel":
            for w, ms, d in pts:
                ax.annotate(str(d), (w, ms), textcoords="offset points", xytext=(0, -11), fontsize=7, ha="center")
    r0 = rows[0]
    ax.set(xscale="log", yscale="log", xlabel="training width (neurons)", ylabel="ms per call (median)",
           title=f"{r0['layer']} dim {r0['dim']}, batch {r0['batch']}, {r0['threads']} threads "
                 f"(labels: depth)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict], fields=FIELDS) -> str:
    """Plain-text table of the rows."""
    cells = [[_fmt(r.get(f)) for f in fields] for r in rows]
    widths = [max(len(f), *(len(c[i]) for c in cells)) if cells else len(f) for i, f in enumerate(fields)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(fields), line(["-" * w for w in widths]), *map(line, cells)])


def format_json(rows: list[dict]) -> str:
    """JSON Lines: one object per row."""
    return "\n".join(json.dumps(r) for r in rows)


def format_csv(rows: list[dict], fields=FIELDS) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().rstrip("\n")


def add_arguments(p) -> None:
    p.add_argument("--layer", default="neuron-tree", choices=sorted(FAMILIES), help="feedforward family")
    p.add_argument("--depth", type=int, default=11, help="size the layer by depth (FFF: leaf x 2^depth wide)")
    p.add_argument("--width", type=int, default=None, help="size the layer by training width instead of --depth")
    p.add_argument("--dim", type=int, default=768, help="input = output width")
    add_ffn_options(p, skip=("depth",))
    p.add_argument("--batch", default="1,64,4096,16384", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per candidate at small batches")
    p.add_argument("--warmup", type=int, default=2)
    add_threads(p)
    p.add_argument("--reference-max-batch", type=int, default=64,
                   help="largest batch for the slow per-sample loop")
    p.add_argument("--no-limits", action="store_true", help="skip measuring copy bandwidth / GEMM peak")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON Lines on stdout instead of the table")
    out.add_argument("--csv", action="store_true", help="CSV on stdout instead of the table")
    p.add_argument("--plot", metavar="PNG", help="also sweep depth 1..15 and plot ms vs training width")
    p.add_argument("--plot-depths", default="1-15", help="depth range for --plot, e.g. 1-15")
    p.add_argument("--plot-batch", type=int, default=64, help="batch size for --plot")
    p.add_argument("--train", action="store_true", help="also run the `fastff train-bench` rows")
    p.add_argument("--onnx", action="store_true", help="also time the layer's ONNX graph under onnxruntime")
    p.add_argument("--quick", action="store_true", help="passed to the --train rows")


def run(args) -> int:
    depth = None if args.width is not None else check_int("--depth", args.depth, 0, 20)
    spec = Spec(args.layer, depth, check_int("--dim", args.dim, 1), ffn_options(args, args.layer), args.width)
    batches = parse_batches(args.batch)
    apply_threads(args)
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)
    limits = None
    if not args.no_limits:
        limits = machine_limits()
        log(f"machine limits: copy {limits['copy_gb_s']:.1f} GB/s, float32 GEMM {limits['gemm_gflop_s']:.1f} GFLOP/s")
    rows = bench_rows(spec, batches, check_int("--repeats", args.repeats, 1), check_int("--warmup", args.warmup, 0),
                      reference_max_batch=args.reference_max_batch, log=log)
    if args.train:
        from .train_bench import train_step_rows
        for batch in batches:
            rows += train_step_rows(spec.dim, batch, args.quick)
    if args.onnx:
        from .onnx_bench import onnx_bench_rows
        rows += onnx_bench_rows(spec.build(), batches)
    sweep = []
    if args.plot:
        lo, _, hi = args.plot_depths.partition("-")
        depths = range(check_int("--plot-depths", int(lo), 0, 20), check_int("--plot-depths", int(hi or lo), 0, 20) + 1)
        sweep = depth_sweep(spec.layer, depths, spec.dim, check_int("--plot-batch", args.plot_batch, 1),
                            max(3, args.repeats // 4), log=log, options=ffn_options(args, args.layer))
        plot_depth(sweep, args.plot)
        log(f"wrote {args.plot}")
    add_limits(rows + sweep, limits)
    if args.json:
        print(format_json(rows + sweep))
    elif args.csv:
        print(format_csv(rows + sweep))
    else:
        print(f"# {spec}, threads={torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
        if limits:
            print(f"# machine: copy bandwidth {limits['copy_gb_s']:.1f} GB/s, "
                  f"float32 GEMM {limits['gemm_gflop_s']:.1f} GFLOP/s")
        print(format_table(rows))
        if sweep:
            print(format_table(sweep, ("layer", "depth", "width", "batch", "backend", "ms", "speedup_vs_dense")))
    return 0
