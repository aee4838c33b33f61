"""Product-key feedforward: a million single-neuron experts behind product-key routing (PEER, He
2024, "Mixture of A Million Experts"; product keys: Lample et al. 2019)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_choice, check_int, check_parameter_bytes
from ..functional import ACTIVATIONS
from ..kernels import product_key as PK
from ..kernels.routing import needs_grad
from ._base import RoutedLayer


def check_key_dim(key_dim) -> int:
    """``key_dim`` must be an even integer >= 2 (queries are split into two halves); returns it."""
    key_dim = check_int("key_dim", key_dim, 2)
    if key_dim % 2:
        raise ValueError(f"key_dim must be even (each query is split into two halves of key_dim/2), got {key_dim}")
    return key_dim


class ProductKeyFF(RoutedLayer):
    """``n_keys**2`` experts, each one neuron: input vector ``w_in[i]``, output vector ``w_out[i]``.

    Per row and head h (of ``heads``): the query q = norm(x·w_query[h]) (``key_dim``), split into
    halves q1, q2, scores s1 = q1·sub_keys[h, 0] and s2 = q2·sub_keys[h, 1] (``n_keys`` each);
    the top-k sub-keys a of s1 and b of s2 give k×k candidates, expert a·n_keys + b with score
    s1[a] + s2[b]; the top-k candidates are the head's experts, weighted by the softmax of their
    scores. y = b_out + Σ_heads Σ_experts weight · act(x·w_in[i]) · w_out[i].
    x (..., in_features) -> (..., out_features).

    Ties in a top-k go to the smaller index (sub-key, then expert index), in every
    implementation. ``query_norm``: "layer" (default; LayerNorm of each head's query, no affine),
    "batch" (BatchNorm over rows of the H·key_dim query features, no affine: training forwards
    normalise with the batch's statistics (>= 2 rows) and update the buffers ``running_mean`` /
    ``running_var`` (momentum 0.1), eval forwards use those, so train and eval compute different
    functions, as with ``nn.BatchNorm1d``; reported to raise expert usage), "none". With "layer"
    and "none" train and eval compute the same function. ``top_k=1`` gives the router no
    gradient (a softmax over one score is 1).

    Which path runs, on CPU float32 / float64 tensors (eager, not traced): in eval mode without
    gradient (no_grad, or nothing requires grad) the numba inference kernel
    (``fastff.kernels.product_key.product_key_cpu``); in training mode, or whenever a gradient is
    needed, the CPU training path (``product_key_train_cpu``: queries and sub-key scores in
    torch, the selection with its softmax and the experts, forward and backward, on numba
    kernels). Everywhere
    else (other devices or dtypes, torch.compile / export tracing, tensor subclasses) the
    vectorised torch path (``fastff.kernels.product_key.product_key``). All evaluate only the
    H·top_k selected experts per row (weight gradients are nonzero only in the selected rows).

    Parameters: w_query (H, D, in), sub_keys (H, 2, n_keys, D/2), w_in (N, in), w_out (N, out),
    b_out (out,); N = n_keys², D = key_dim. Init: w_query, w_in uniform ±1/sqrt(in); sub_keys
    normal with std 1/sqrt(D/2) (unit-variance scores for unit-variance queries); w_out, b_out
    uniform ±1/sqrt(H·top_k) (the experts active per row).
    """

    _reference = "w_in"

    def __init__(self, in_features: int, out_features: int, n_keys: int, heads: int = 4, top_k: int = 8,
                 key_dim: int = 32, activation: str = "gelu", query_norm: str = "layer"):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.n_keys = check_int("n_keys", n_keys, 1)
        self.heads = check_int("heads", heads, 1)
        self.top_k = check_int("top_k", top_k, 1, n_keys)
        self.key_dim = check_key_dim(key_dim)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self.query_norm = check_choice("query_norm", query_norm, PK.QUERY_NORMS)
        N, H, D = n_keys * n_keys, heads, key_dim
        check_parameter_bytes(f"ProductKeyFF(n_keys={n_keys}, heads={heads}, key_dim={key_dim})",
                              H * D * in_features + H * n_keys * D + N * (in_features + out_features) + out_features)
        b_in, b_out = 1 / math.sqrt(in_features), 1 / math.sqrt(H * top_k)
        self.w_query = nn.Parameter(torch.empty(H, D, in_features).uniform_(-b_in, b_in))
        self.sub_keys = nn.Parameter(torch.randn(H, 2, n_keys, D // 2) / math.sqrt(D // 2))
        self.w_in = nn.Parameter(torch.empty(N, in_features).uniform_(-b_in, b_in))
        self.w_out = nn.Parameter(torch.empty(N, out_features).uniform_(-b_out, b_out))
        self.b_out = nn.Parameter(torch.empty(out_features).uniform_(-b_out, b_out))
        if query_norm == "batch":
            self.register_buffer("running_mean", torch.zeros(H * D))
            self.register_buffer("running_var", torch.ones(H * D))

    @property
    def experts(self) -> int:
        return self.n_keys * self.n_keys

    @property
    def training_width(self) -> int:
        """Experts (one neuron each): ``n_keys**2``."""
        return self.experts

    @property
    def neurons_per_inference(self) -> int:
        """Dot products per row, as neurons: ``heads · (top_k + key_dim + n_keys)`` = the selected
        experts, the query features and the sub-key scores (each pair of half-width sub-key dot
        products counted as one key_dim-wide neuron)."""
        return self.heads * (self.top_k + self.key_dim + self.n_keys)

    def _weights(self) -> tuple:
        return self.w_query, self.sub_keys, self.w_in, self.w_out, self.b_out

    def _running(self):
        return (self.running_mean, self.running_var) if self.query_norm == "batch" else None

    def select(self, x: torch.Tensor):
        """The experts eval mode picks: x (B, in) -> (scores (B, H, k), experts (B, H, k) long),
        largest score first (the batch norm uses its running statistics; nothing is updated)."""
        return PK.select(PK.queries(x, self.w_query, self.query_norm, self._running()), self.sub_keys, self.top_k)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        weights = self._weights()
        args = (x, *weights, self.top_k, self.activation, self.query_norm, self._running())
        if type(x) is torch.Tensor and not torch.compiler.is_compiling() and PK.applies(x, *weights):
            if not self.training and not needs_grad(x, *weights):
                return PK.product_key_cpu(*args)[0]
            return PK.product_key_train_cpu(*args, update=self.training)[0]
        return PK.product_key(*args, update=self.training)[0]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_keys={self.n_keys}, "
                f"heads={self.heads}, top_k={self.top_k}, key_dim={self.key_dim}, activation={self.activation!r}, "
                f"query_norm={self.query_norm!r}")
