"""A small decoder-only transformer (GPT) whose feedforward blocks are chosen by name.

Every block is pre-LayerNorm: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``; the FFN is built by
its family (``fastff.layers.families``: ``dense``, ``fff``, ``neuron-tree``, ``moe``, ...), so the
same model trains with a dense or a fast feedforward. Token + learned position embeddings, a final
LayerNorm and an output head tied to the token embedding.

Generation keeps a key/value cache (``KVCache``): the prompt is run once, then each new token
costs one position. Shapes: ``B`` batch, ``T`` tokens, ``C = dim``, ``H`` heads,
``D = dim / heads``, ``V`` vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_bool, check_fraction, check_int
from ..layers.families import family

INIT_STD = 0.02


@dataclass
class GPTConfig:
    """Model shape and feedforward choice. ``dataclasses.asdict(cfg)`` is plain JSON and
    ``GPTConfig.from_dict`` rebuilds it.

    ``ffn`` names a feedforward family (``fastff.layers.FAMILIES``), ``ffn_width`` is each block's
    FFN training width (default ``4 * dim``) and ``ffn_options`` the family's options (e.g.
    ``{"train_mode": "hard_path", "master_leaf": "token"}`` for ``fff``), completed with the
    family's defaults and checked on construction. ``usage_counters``: the feedforwards count
    their usage (what ``LocalAdam`` reads; ``Family.local_usage``).
    """
    vocab_size: int
    context: int
    layers: int
    heads: int
    dim: int
    dropout: float = 0.0
    ffn: str = "dense"
    ffn_width: int | None = None
    ffn_options: dict = field(default_factory=dict)
    usage_counters: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "context", "layers", "heads", "dim"):
            check_int(name, getattr(self, name), 1)
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim={self.dim}, heads={self.heads}")
        check_fraction("dropout", self.dropout, high=0.99)
        check_bool("usage_counters", self.usage_counters)
        fam = family(self.ffn)
        self.ffn = fam.name
        if self.ffn_width is None:
            self.ffn_width = 4 * self.dim
        check_int("ffn_width", self.ffn_width, 1)
        if not isinstance(self.ffn_options, dict):
            raise ValueError(f"ffn_options must be a dict of {fam.name} options, got {self.ffn_options!r}")
        self.ffn_options = fam.resolve(self.ffn_width, self.ffn_options)

    @property
    def local_usage(self) -> str | None:
        """The ``usage`` the feedforwards are built with (None: no counters)."""
        return family(self.ffn).local_usage if self.usage_counters else None

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        """Rebuild from ``dataclasses.asdict(cfg)`` (e.g. read from a run's config.json); the
        earlier flat feedforward fields (``leaf``, ``trees``, ``depth``, ``top_k``, ``activation``)
        move into ``ffn_options``."""
        values = dict(values)
        options = dict(values.pop("ffn_options", None) or {})
        if options.pop("usage", None) is not None:
            values["usage_counters"] = True
        fam = family(values.get("ffn", "dense"))
        for name in FLAT_FFN_FIELDS:
            if name in values:
                value = values.pop(name)
                if fam.option(name) is not None:
                    options.setdefault(name, value)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; the model section takes "
                             f"{', '.join(f.name for f in fields(cls))}")
        return cls(**values, ffn_options=options)


# feedforward fields that configs of the earlier format kept outside ``ffn_options``
FLAT_FFN_FIELDS = ("leaf", "trees", "depth", "top_k", "activation")


class KVCache:
    """Keys and values of every layer for up to ``context`` positions, preallocated:
    ``k``, ``v`` (layers, B, H, context, D). The first ``length`` positions are filled."""

    def __init__(self, layers: int, batch: int, heads: int, context: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, heads, context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) of ``layer`` after the filled positions; return that layer's
        keys and values (B, H, length + T, D). ``advance`` moves ``length`` once all layers ran."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: x (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.resid_drop = nn.Dropout(cfg.dropout)
        for linear, std in ((self.qkv, INIT_STD), (self.proj, INIT_STD / math.sqrt(2 * cfg.layers))):
            nn.init.normal_(linear.weight, 0.0, std)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Without ``cache``: causal attention within x. With it: x holds the T positions after
        the cache's ``length``; they attend to every cached position and causally to each other,
        and their keys / values are stored in ``cache`` at ``layer``."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)   # (B, H, T, D) each
                   for t in self.qkv(x).split(C, dim=-1))
        dropout = self.dropout if self.training else 0.0
        if cache is None or cache.length == 0:
            if cache is not None:
                cache.append(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            past = cache.length
            k, v = cache.append(layer, k, v)                                  # (B, H, past + T, D)
            # query i (absolute position past + i) sees keys 0 .. past + i; one new token sees all
            mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)                                # (B, T, C)
        return self.resid_drop(self.proj(y))


class NoFFN(nn.Module):
    """A feedforward that adds nothing (x -> 0): a model's time outside its feedforwards (the Amdahl ceiling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        runtime = {} if cfg.local_usage is None else {"usage": cfg.local_usage}
        self.ffn = family(cfg.ffn).build(cfg.dim, cfg.dim, cfg.ffn_width, cfg.ffn_options, **runtime)
        self.ffn_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.ffn_drop(self.ffn(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer over token ids; see the module docstring."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.context, cfg.dim)
        nn.init.normal_(self.tok_emb.weight, 0.0, INIT_STD)
        nn.init.normal_(self.pos_emb.weight, 0.0, INIT_STD)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight                                # tied

    @property
    def ffns(self) -> list[nn.Module]:
        """The FFN layer of every block, first to last."""
        return [block.ffn for block in self.blocks]

    @property
    def ffn_neurons_per_token(self) -> int:
        """FFN neurons evaluated per token at inference, summed over blocks."""
        return sum(ffn.neurons_per_inference for ffn in self.ffns)

    @property
    def ffn_training_width(self) -> int:
        """FFN neurons trained, summed over blocks."""
        return sum(ffn.training_width for ffn in self.ffns)

    @property
    def n_params(self) -> int:
        """Trainable numbers (the tied embedding / head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_tokens(self, idx: torch.Tensor, what: str) -> None:
        """idx must be an integer tensor (..., T), T >= 1, of ids in [0, vocab_size)."""
        if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex \
                or idx.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer tensor of token ids, got "
                            f"{idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dim() == 0:
            raise ValueError(f"{what} must have a token dimension (..., T), got a 0-d tensor")
        if idx.shape[-1] == 0:
            raise ValueError(f"{what} is empty (shape {tuple(idx.shape)}); give at least one token")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            raise ValueError(f"{what} holds token ids in [{idx.min().item()}, {idx.max().item()}]; "
                             f"they must be in [0, {self.cfg.vocab_size})")

    def _logits(self, idx: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """idx (B, T) at positions start .. start + T - 1 -> logits (B, T, V)."""
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.emb_drop(self.tok_emb(idx) + self.pos_emb(pos))             # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        return self.head(self.ln_f(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (..., T) token ids -> (logits (..., T, V), mean cross entropy against targets
        (..., T) over all positions, or None without targets)."""
        self._check_tokens(idx, "idx")
        T = idx.shape[-1]
        if T > self.cfg.context:
            raise ValueError(f"idx has {T} tokens but the model's context is {self.cfg.context}; "
                             f"pass at most {self.cfg.context} tokens")
        logits = self._logits(idx.reshape(-1, T), 0, None).reshape(*idx.shape, self.cfg.vocab_size)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        return logits, F.cross_entropy(logits.reshape(-1, self.cfg.vocab_size), targets.reshape(-1))

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``context`` tokens (model dtype/device)."""
        p = self.tok_emb.weight
        return KVCache(self.cfg.layers, check_int("batch", batch, 1), self.cfg.heads, self.cfg.context,
                       self.cfg.dim // self.cfg.heads, p.dtype, p.device)

    def forward_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """idx (B, T) = the next T tokens after the ``cache.length`` cached ones -> logits
        (B, T, V); their keys / values are added to ``cache``."""
        self._check_tokens(idx, "idx")
        if idx.dim() != 2 or idx.shape[0] != cache.batch:
            raise ValueError(f"idx must have shape ({cache.batch}, T) to match the cache, got {tuple(idx.shape)}")
        if cache.length + idx.shape[1] > cache.capacity:
            raise ValueError(f"the cache holds {cache.length} of {cache.capacity} positions; "
                             f"{idx.shape[1]} more do not fit")
        logits = self._logits(idx, cache.length, cache)
        cache.advance(idx.shape[1])
        return logits

    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, sliding: bool = False) -> torch.Tensor:
        """Continue prompts idx (B, T0) by ``new_tokens`` sampled tokens -> (B, T0 + new_tokens).

        Runs in eval mode (the previous mode is restored) without autograd, with a KV cache.
        ``temperature`` 0 picks the most likely token; ``top_k`` samples among the k most likely.
        ``T0 + new_tokens`` must fit in the context, unless ``sliding``: then, whenever the cache
        is full, the last ``context // 2`` tokens are prefilled into a fresh cache and decoding
        continues (the model sees at most ``context`` tokens, as in training). The prompt itself
        must fit in the context either way.
        """
        self._check_tokens(idx, "prompt")
        if idx.dim() != 2:
            raise ValueError(f"prompt must have shape (B, T0), got {tuple(idx.shape)}")
        new_tokens = check_int("new_tokens", new_tokens, 0)
        T0, context = idx.shape[1], self.cfg.context
        if T0 > context or (T0 + new_tokens > context and not sliding):
            raise ValueError(f"prompt of {T0} tokens + {new_tokens} new tokens exceeds the context of {context}; "
                             f"ask for at most {max(0, context - T0)} new tokens, shorten the prompt, or slide the "
                             f"context window (sliding=True)")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None:
            check_int("top_k", top_k, 1, self.cfg.vocab_size)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                cache = self.new_cache(idx.shape[0])
                out = idx
                logits = self.forward_step(idx, cache)[:, -1]                  # (B, V)
                for step in range(new_tokens):
                    token = _sample(logits, temperature, top_k, generator)     # (B, 1)
                    out = torch.cat((out, token), dim=1)
                    if step + 1 == new_tokens:
                        break
                    if cache.length == context:                                # full: keep the recent half
                        cache = self.new_cache(idx.shape[0])
                        logits = self.forward_step(out[:, -(context // 2):], cache)[:, -1]
                    else:
                        logits = self.forward_step(token, cache)[:, -1]
                return out
        finally:
            self.train(was_training)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits (B, V) -> (B, 1) long."""
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                     # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
