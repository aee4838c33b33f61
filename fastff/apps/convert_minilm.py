"""`fastff convert-minilm`: carve FFF feedforwards into the pretrained all-MiniLM-L6-v2 sentence
encoder, distil them, and measure embedding quality and CPU speed against the dense model and
against what a user would pick instead: the dense FFNs pruned to the same neurons per token
(same importance score, same distillation), int8 dynamic quantization, and each conversion with
its other Linear layers in int8.

Model and pipeline: ``fastff.models.minilm``. Text: ``fastff.data.sentences`` (default Debian
``fortunes``, or ``--text``), deduplicated, then split into disjoint calibration and held-out
evaluation sets. Human labels: ``fastff.data.similarity`` (gensim's Lee corpus and polarity
sentences).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .. import kernels
from ..data.sentences import DEFAULT_TEXT, load_sentences, split_sentences
from ..data.similarity import lee_corpus, polarity_sentences
from ..models.integrate import find_ffn
from ..models.minilm import convert, embed, encode_batches, load_minilm
from ..models.quantize import quantize_int8
from ..models.sequential import distill_model
from ..threads import set_threads
from .timing import median_times

DEFAULT_CONFIGS = "1:512:512,2:256:256,3:128:128,4:64:64"
KINDS = ("dense", "int8", "pruned", "pruned+int8", "fff", "fff+int8")


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


def human_scores(lee_embeddings: torch.Tensor, lee_human: np.ndarray, pol_embeddings: torch.Tensor,
                 pol_labels: np.ndarray, folds: int = 10, repeats: int = 5) -> dict:
    """Agreement with human labels, not with the dense model: Pearson / Spearman correlation of the
    embeddings' pairwise cosines (Lee documents (n, D), pairs ``np.triu_indices(n, 1)``) with the
    human ratings ``lee_human``, and the accuracy (mean, std over folds) of a logistic regression
    on the polarity sentences' embeddings (m, D), ``repeats`` x stratified ``folds``-fold
    cross-validation with fixed folds (seed 0), so every model is scored on the same splits (fewer
    folds if a class has fewer than ``folds`` sentences)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score

    sim = (lee_embeddings @ lee_embeddings.T).numpy()[np.triu_indices(len(lee_embeddings), 1)]
    folds = min(folds, int(np.bincount(pol_labels).min()))
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=0)
    acc = cross_val_score(LogisticRegression(max_iter=2000), pol_embeddings.numpy(), pol_labels, cv=cv)
    return {"lee_pearson": float(pearsonr(sim, lee_human)[0]), "lee_spearman": float(spearmanr(sim, lee_human)[0]),
            "polarity_acc": float(acc.mean()), "polarity_std": float(acc.std()), "polarity_cv": f"{repeats} x {folds}"}


def bench_batch(tok, sentences: list[str], batch: int, seq_len: int) -> dict:
    """``batch`` full-length sequences of real held-out text: [CLS] tokens... [SEP], no padding."""
    ids = tok(" ".join(sentences), add_special_tokens=False)["input_ids"]
    body = seq_len - 2
    need = batch * body
    ids = (ids * (need // max(1, len(ids)) + 1))[:need]
    rows = [[tok.cls_token_id, *ids[i * body:(i + 1) * body], tok.sep_token_id] for i in range(batch)]
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.inference_mode()
def benchmark(models: dict, tok, sentences, batch_sizes, seq_len: int, repeats: int) -> dict:
    """Median seconds per call, {batch: {variant: {"ffn": s, "encoder": s}}} for every model of
    ``models`` (one interleaved ``median_times`` call per batch size and measure). FFN time = all 6
    FFN blocks (``output.dense(intermediate(x))``, which is the new layer alone in a converted model)
    applied to the first model's own block inputs."""
    ref = next(iter(models.values()))
    names = [n for n, _, _ in find_ffn(ref)]
    out = {}
    for b in batch_sizes:
        enc = bench_batch(tok, sentences, b, seq_len)
        x = {}
        hooks = [ref.get_submodule(n).intermediate.register_forward_pre_hook(
            lambda _m, a, n=n: x.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).clone())) for n in names]
        ref(**enc)
        for h in hooks:
            h.remove()
        blocks = {k: [(lambda t, L=m.get_submodule(n): L.output.dense(L.intermediate(t)), x[n]) for n in names]
                  for k, m in models.items()}
        ffn = median_times({k: (lambda fs=fs: [f(t) for f, t in fs]) for k, fs in blocks.items()}, repeats)
        encoder = median_times({k: (lambda m=m: m(**enc)) for k, m in models.items()}, repeats)
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


# Block conversions without some of the pipeline's parts, for the ablation columns of the report.
ABLATIONS = {"independent": dict(sequential=False, target="local", ln_weights=False),
             "sequential": dict(sequential=True, target="local", ln_weights=False),
             "+ residual targets": dict(sequential=True, target="residual", ln_weights=False)}


def evaluate_configs(calib: list[str], held: list[str], configs, carve_sentences: int = 2000, block_steps: int = 50,
                     steps: int = 2000, lr: float = 3e-3, batch_size: int = 32, seq_len: int = 128,
                     batch_sizes=(1, 64), repeats: int = 7, retrieval_queries: int = 200, topk: int = 10,
                     progress: bool = True, max_carve_tokens: int = 8000, threads: int | None = None,
                     ablation: bool = False, val_sentences: int = 320, baselines: bool = True,
                     human: dict | None = None) -> dict:
    """Convert, evaluate and benchmark every (depth, leaf_width, master) config (see ``convert``)
    and, with ``baselines``, the dense model pruned to the same neurons per token (``"pruned-N"``,
    same pipeline), int8 dynamic quantization of the dense model (``"int8"``) and of every
    conversion's other Linear layers (``"<key>+int8"``). Rows: one per variant, ``kind`` in ``KINDS``.

    The blocks are carved on the first ``carve_sentences`` calibration sentences; the end-to-end
    distillation runs ``steps`` batches of ``batch_size`` drawn from ``calib`` except its last
    ``val_sentences`` (at most a fifth of it), on which it keeps the best weights. ``held`` is
    only embedded for the quality measures and timed. Human labels: ``human`` = {"lee": (documents,
    pair ratings), "polarity": (sentences, labels)} (default: gensim's files, see
    ``fastff.data.similarity``), scored by ``human_scores``. ``ablation``: also convert the FFF
    blocks the ``ABLATIONS`` ways and record their held-out mean cosine (row["ablation"]).
    ``threads`` (if given) is applied with ``torch.set_num_threads`` right before timing."""
    tok, dense = load_minilm()
    t0 = time.perf_counter()
    human = human or {"lee": lee_corpus(), "polarity": polarity_sentences()}
    carve_batches = encode_batches(tok, calib[:carve_sentences], 64)
    n_val = min(val_sentences, len(calib) // 5)
    distill_batches = encode_batches(tok, calib[:len(calib) - n_val], batch_size)
    val_batches = encode_batches(tok, calib[len(calib) - n_val:], batch_size) if n_val else None
    e_dense = embed(dense, tok, held)
    queries, k = min(retrieval_queries, len(held)), min(topk, len(held) - 1)
    hidden = find_ffn(dense)[0][2].w1.shape[0]
    models = {"dense": dense}
    rows = [{"key": "dense", "kind": "dense", "neurons": hidden}]
    if baselines:
        models["int8"] = quantize_int8(dense)
        rows.append({"key": "int8", "kind": "int8", "neurons": hidden})

    def blocks(depth, leaf, master, **opts):
        return convert(dense, carve_batches, depth, leaf, master, block_steps=block_steps,
                       max_carve_tokens=max_carve_tokens, progress=progress, **opts)

    def cos_mean(model) -> float:
        return quality(e_dense, embed(model, tok, held), queries, k)["cos_mean"]

    for depth, leaf, master in configs:
        for method in ("carve", "prune") if baselines else ("carve",):
            kind = "fff" if method == "carve" else "pruned"
            key = f"d{depth}-l{leaf}-m{master}" if kind == "fff" else f"pruned-{depth + leaf + master}"
            ablated = {name: cos_mean(blocks(depth, leaf, master, **opts)[0])
                       for name, opts in (ABLATIONS.items() if ablation and kind == "fff" else ())}
            t1 = time.perf_counter()
            conv, stats = blocks(depth, leaf, master, method=method)
            cos_blocks = cos_mean(conv)
            best_step = None
            if steps:
                best_step = distill_model(conv, dense, distill_batches, steps, lr=lr, progress=progress,
                                          val_batches=val_batches).get("best_step", steps)
            convert_s = time.perf_counter() - t1
            rows.append({"key": key, "kind": kind, "depth": depth, "leaf": leaf, "master": master,
                         "neurons": depth + leaf + master, "convert_s": convert_s,
                         "captured": statistics.mean(s["captured"] for s in stats),
                         "max_share": statistics.mean(s["max_share"] for s in stats),
                         "rel_carved": statistics.mean(s["rel_before"] for s in stats),
                         "rel_blocks": statistics.mean(s["rel_after"] for s in stats),
                         "cos_blocks": cos_blocks, "best_step": best_step, "ablation": ablated,
                         "dropped": stats[0]["dropped"]})
            models[key] = conv
            if baselines:
                models[f"{key}+int8"] = quantize_int8(conv)
                rows.append({"key": f"{key}+int8", "kind": f"{kind}+int8", "neurons": depth + leaf + master})
            if progress:
                print(f"{key}: cos {cos_blocks:.4f} after blocks ({convert_s:.0f} s)", flush=True)
    (docs, ratings), (sentences, labels) = human["lee"], human["polarity"]
    for row in rows:
        m = models[row["key"]]
        row.update(quality(e_dense, embed(m, tok, held), queries, k))
        row.update(human_scores(embed(m, tok, docs), ratings, embed(m, tok, sentences), labels))
        if progress:
            print(f"{row['key']}: cos {row['cos_mean']:.4f} (p5 {row['cos_p5']:.4f}) nn@{k} {row['nn_agree']:.3f} "
                  f"Lee r {row['lee_pearson']:.4f} polarity {row['polarity_acc']:.3f}", flush=True)
    backend = kernels.get_backend()
    fff = next((models[r["key"]] for r in rows if r["kind"] == "fff"), None)
    if backend == "auto" and fff is not None:
        layer = fff.get_submodule(find_ffn(dense)[0][0]).intermediate
        with torch.inference_mode():
            backend += " -> " + ("cpu" if kernels.cpu_applies(*layer.parameters()) else "torch")
    if threads:
        set_threads(threads)
    n_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    times = benchmark(models, tok, held, batch_sizes, seq_len, repeats)
    for row in rows:
        row["ffn_speedup"] = {b: times[b]["dense"]["ffn"] / times[b][row["key"]]["ffn"] for b in batch_sizes}
        row["enc_speedup"] = {b: times[b]["dense"]["encoder"] / times[b][row["key"]]["encoder"] for b in batch_sizes}
    return {"rows": rows, "times": times, "backend": backend, "threads": n_threads,
            "loadavg": [load_before, os.getloadavg()],
            "n_calib": len(calib), "n_carve": min(carve_sentences, len(calib)), "n_eval": len(held),
            "n_val": n_val, "n_lee": len(docs), "n_polarity": len(sentences),
            "calib_tokens": sum(int(b["attention_mask"].sum()) for b in distill_batches),
            "block_steps": block_steps, "steps": steps, "lr": lr, "batch_size": batch_size,
            "seq_len": seq_len, "batch_sizes": list(batch_sizes), "repeats": repeats,
            "queries": queries, "topk": k, "total_s": time.perf_counter() - t0}


RESULTS_BEGIN, RESULTS_END = "<!-- convert-minilm results -->", "<!-- /convert-minilm results -->"


def minilm_target(res: dict, min_speedup: float = 1.5, min_cos: float = 0.95, max_lee_drop: float = 0.01) -> dict:
    """The target check at the largest timed batch: FFF conversions (also with int8 Linears) with
    encoder speed-up >= ``min_speedup``; each is "above the baselines" if its mean cosine beats every
    int8 / pruned / pruned+int8 variant that is at least as fast, and meets the target if also
    cosine >= ``min_cos`` and its Lee correlation is within ``max_lee_drop`` of the dense model's.
    Returns {"batch", "dense_lee", "candidates": [(row, best baseline row at least as fast or None,
    above, met)], "met"}."""
    b = res["batch_sizes"][-1]
    rows = res["rows"]
    dense_lee = next(r["lee_pearson"] for r in rows if r["kind"] == "dense")
    base = [r for r in rows if r["kind"] in ("int8", "pruned", "pruned+int8")]
    out = []
    for r in sorted((r for r in rows if r["kind"].startswith("fff") and r["enc_speedup"][b] >= min_speedup),
                    key=lambda r: -r["cos_mean"]):
        rival = max((q for q in base if q["enc_speedup"][b] >= r["enc_speedup"][b]), key=lambda q: q["cos_mean"],
                    default=None)
        above = rival is None or r["cos_mean"] > rival["cos_mean"]
        met = above and r["cos_mean"] >= min_cos and abs(r["lee_pearson"] - dense_lee) <= max_lee_drop
        out.append((r, rival, above, met))
    return {"batch": b, "dense_lee": dense_lee, "candidates": out, "met": any(c[3] for c in out),
            "min_speedup": min_speedup, "min_cos": min_cos, "max_lee_drop": max_lee_drop}


MARKERS = {"dense": ("black", "*"), "int8": ("tab:orange", "D"), "pruned": ("tab:blue", "s"),
           "pruned+int8": ("tab:cyan", "s"), "fff": ("tab:red", "o"), "fff+int8": ("tab:pink", "o")}


def _plot(res: dict, png_path) -> None:
    """Mean cosine vs whole-encoder speed-up, one panel per timed batch size, one line per kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = res["batch_sizes"]
    fig, axes = plt.subplots(1, len(bs), figsize=(6.5 * len(bs), 5), squeeze=False)
    for ax, b in zip(axes[0], bs):
        for kind, (colour, marker) in MARKERS.items():
            sub = sorted((r for r in res["rows"] if r["kind"] == kind), key=lambda r: r["enc_speedup"][b])
            if sub:
                ax.plot([r["enc_speedup"][b] for r in sub], [r["cos_mean"] for r in sub], marker=marker, color=colour,
                        label=kind, ms=7 if kind == "dense" else 5)
                for r in sub:
                    if b == bs[-1] and not kind.endswith("int8"):
                        ax.annotate(r["key"], (r["enc_speedup"][b], r["cos_mean"]), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")
        ax.axhline(0.95, ls="--", c="grey", lw=0.8)
        ax.axvline(1.5, ls="--", c="grey", lw=0.8)
        ax.set_xlabel(f"whole-encoder speed-up vs dense (batch {b}, seq {res['seq_len']})")
        ax.set_ylabel("mean cosine(dense, variant) on held-out sentences")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2: FFF conversions vs pruned dense FFNs vs int8")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def write_report(res: dict, md_path, png_path, command: str) -> None:
    """Markdown tables + frontier plot (mean cosine vs whole-encoder speed-up) of ``evaluate_configs``.

    If ``md_path`` exists and holds the ``RESULTS_BEGIN``/``RESULTS_END`` markers, only the text
    between them is replaced; otherwise the file is (over)written with the results alone."""
    _plot(res, png_path)
    bs, t, rows = res["batch_sizes"], res["times"], res["rows"]
    main = ["| variant | kind | neurons/token | cos mean | cos p5 | top-%d agree | Lee r | Lee ρ | polarity acc | "
            % res["topk"] + " | ".join(f"FFN x (b{b})" for b in bs) + " | "
            + " | ".join(f"encoder x (b{b})" for b in bs) + " |", "|" + "---|" * (9 + 2 * len(bs))]
    for r in rows:
        main.append(f"| {r['key']} | {r['kind']} | {r['neurons']} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | "
                    f"{r['nn_agree']:.3f} | {r['lee_pearson']:.4f} | {r['lee_spearman']:.4f} | "
                    f"{100 * r['polarity_acc']:.1f} ± {100 * r['polarity_std']:.1f} | "
                    + " | ".join(f"{r['ffn_speedup'][b]:.2f}" for b in bs) + " | "
                    + " | ".join(f"{r['enc_speedup'][b]:.2f}" for b in bs) + " |")
    details = ["| variant | dropped/layer | busiest leaf | captured | rel. error carved -> distilled "
               "| cos after blocks | e2e step kept |", "|---|---|---|---|---|---|---|"]
    details += [f"| {r['key']} | {r['dropped']} | {r['max_share']:.2f} | {r['captured']:.3f} | "
                f"{r['rel_carved']:.3f} -> {r['rel_blocks']:.3f} | {r['cos_blocks']:.4f} | {r['best_step']} |"
                for r in rows if r["kind"] in ("fff", "pruned")]
    ablation = []
    if any(r.get("ablation") for r in rows):
        ablation = ["Ablation (mean cosine on the held-out sentences; each column adds one part of the pipeline to "
                    "the one before; the first three are block conversions without the later parts):", "",
                    "| config | " + " | ".join(ABLATIONS) + " | + LayerNorm weights | + end-to-end |",
                    "|---|" + "---|" * (len(ABLATIONS) + 2)]
        ablation += [f"| {r['key']} | " + " | ".join(f"{r['ablation'][a]:.4f}" for a in ABLATIONS)
                     + f" | {r['cos_blocks']:.4f} | {r['cos_mean']:.4f} |" for r in rows if r.get("ablation")]
        ablation.append("")
    timing = ["| variant | " + " | ".join(f"FFN ms (b{b}) | encoder ms (b{b})" for b in bs) + " |",
              "|---|" + "---|---|" * len(bs)]
    for k in t[bs[0]]:
        timing.append(f"| {k} | " + " | ".join(f"{t[b][k]['ffn'] * 1e3:.2f} | {t[b][k]['encoder'] * 1e3:.2f}"
                                             for b in bs) + " |")
    target = minilm_target(res)
    verdict = [f"Target (an FFF conversion above the pruned-dense and int8 variants at encoder speed-up ≥ "
               f"{target['min_speedup']}x, batch {target['batch']}, with mean cosine ≥ {target['min_cos']} and Lee "
               f"correlation within {target['max_lee_drop']} of dense, {target['dense_lee']:.4f}): "
               f"**{'met' if target['met'] else 'missed'}**."]
    if not target["candidates"]:
        verdict.append(f"- No FFF conversion reaches {target['min_speedup']}x at batch {target['batch']}.")
    for r, rival, above, met in target["candidates"]:
        versus = (f"best baseline at least as fast: {rival['key']} (cos {rival['cos_mean']:.4f}, "
                  f"{rival['enc_speedup'][target['batch']]:.2f}x)") if rival else "no baseline is as fast"
        verdict.append(f"- {r['key']}: {r['enc_speedup'][target['batch']]:.2f}x, cos {r['cos_mean']:.4f}, Lee r "
                       f"{r['lee_pearson']:.4f} ({r['lee_pearson'] - target['dense_lee']:+.4f}); {versus}; "
                       f"{'above' if above else 'not above'} the baselines.")
    body = "\n".join([
        "## Results (generated by `fastff convert-minilm`)", "",
        f"Command: `{command}`", "",
        f"Calibration: {res['n_calib']} sentences ({res['calib_tokens']} tokens), the first {res['n_carve']} "
        f"of them used to carve (or rank, for pruning); held-out evaluation: {res['n_eval']} sentences, retrieval = "
        f"top-{res['topk']} neighbours of {res['queries']} queries among all held-out sentences. Blocks: converted "
        f"and distilled in turn (residual targets, LayerNorm error weights; ridge refit + {res['block_steps']} Adam "
        f"steps each). End to end: {res['steps']} Adam steps (lr {res['lr']}, cosine decay, {res['batch_size']} "
        f"sentences per step) on the final embeddings and hidden states, routing frozen, on the calibration "
        f"sentences but the last {res['n_val']}, on which the loss is checked every tenth of the run: the weights "
        f"of the best check are kept (step 0 = the blocks' weights). Pruned = the dense FFN's most important "
        f"neurons (same score), as many per token as the FFF config evaluates, through the same pipeline; "
        f"+int8 = every nn.Linear outside fastff layers dynamically quantized "
        f"(`torch.ao.quantization.quantize_dynamic`). Human labels: Lee r / ρ = Pearson / Spearman correlation "
        f"of the cosine similarities of the {res['n_lee']} Lee documents with the mean human ratings of their "
        f"pairs; polarity acc = logistic regression on the embeddings of {res['n_polarity']} polarity sentences, "
        f"{rows[0]['polarity_cv']}-fold stratified cross-validation (same folds for every variant), mean ± std "
        f"over folds. "
        f"Speed: median of {res['repeats']} interleaved runs (all variants in one `median_times` call per batch "
        f"size and measure), sequence length {res['seq_len']}, torch threads {res['threads']}, FFF backend "
        f"`{res['backend']}`, torch.inference_mode(); load average (1, 5, 15 min) before timing "
        f"{', '.join(f'{x:.2f}' for x in res['loadavg'][0])}, after {', '.join(f'{x:.2f}' for x in res['loadavg'][1])}. "
        f"Total run time {res['total_s']:.0f} s.", "",
        "\n".join(main), "",
        *verdict, "",
        "neurons/token = depth + leaf_width + master (pruned: the same number of dense neurons); x = dense time / "
        "variant time.", "",
        "Conversion details: busiest leaf = share of calibration tokens routed to the most used leaf (mean over "
        "layers); captured = share of the importance held by each token's leaf + master (pruned: by the kept "
        "neurons); rel. error = LayerNorm-weighted squared error of the FFN output / weighted output variance on "
        "calibration tokens, right after carving (pruning) and after the block's distillation (mean over layers); "
        "cos after blocks = mean cosine before the end-to-end distillation; e2e step kept = the end-to-end step "
        "whose weights were kept.", "",
        "\n".join(details), "",
        *ablation,
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
    parser.add_argument("--calib", type=int, default=None,
                        help="calibration sentences (default: every sentence not held out)")
    parser.add_argument("--carve-sentences", type=int, default=2000,
                        help="calibration sentences the blocks are carved and distilled on")
    parser.add_argument("--eval", type=int, default=500, help="held-out evaluation sentences")
    parser.add_argument("--queries", type=int, default=100, help="retrieval queries (from the held-out set)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="depth:leaf_width:master,...")
    parser.add_argument("--block-steps", type=int, default=50, help="Adam steps per block after its ridge refit")
    parser.add_argument("--steps", type=int, default=2000, help="end-to-end distillation steps (0: none)")
    parser.add_argument("--lr", type=float, default=3e-3, help="end-to-end distillation learning rate")
    parser.add_argument("--batch", type=int, default=32, help="sentences per end-to-end distillation step")
    parser.add_argument("--val-sentences", type=int, default=320,
                        help="calibration sentences held back to pick the best end-to-end step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--carve-tokens", type=int, default=8000, help="calibration tokens per layer used to carve")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the ablation conversions (independent / sequential / residual targets)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the baselines (pruned dense FFNs, int8 dynamic quantization, conversions + int8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/minilm.md")
    parser.add_argument("--plot", default="docs/minilm_frontier.png")


def run(args) -> int:
    if args.threads:
        set_threads(args.threads)
    torch.manual_seed(args.seed)
    configs = _parse_configs(args.configs)
    sentences = load_sentences(args.text)
    n_calib = len(sentences) - args.eval if args.calib is None else args.calib
    calib, held = split_sentences(sentences, n_calib, args.eval, args.seed)
    res = evaluate_configs(calib, held, configs, carve_sentences=args.carve_sentences, block_steps=args.block_steps,
                           steps=args.steps, lr=args.lr, batch_size=args.batch, seq_len=args.seq_len,
                           batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), repeats=args.repeats,
                           retrieval_queries=args.queries, max_carve_tokens=args.carve_tokens,
                           threads=args.threads, ablation=not args.no_ablation, val_sentences=args.val_sentences,
                           baselines=not args.no_baselines)
    write_report(res, args.out, args.plot, command=getattr(args, "command_line", "fastff convert-minilm"))
    print(Path(args.out).read_text())
    return 0
