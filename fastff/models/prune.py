"""The baseline a practitioner would try before a tree: a narrower dense FFN keeping the most
important neurons of a trained one (``prune``), ranked by the score ``carve`` uses
(``neuron_importance``); ``distill`` and ``distill_model`` train it like a carved FFF."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import check_int
from ..layers.dense import DenseFF
from .convert import as_dense, neuron_importance

__all__ = ["Pruned", "prune"]


class Pruned(NamedTuple):
    """Result of ``prune``: layer, the DenseFF; kept (N,) long: dense neuron indices it holds
    (most important first); dropped (H - N,) long; captured: share of the calibration tokens'
    total importance held by the kept neurons."""
    layer: DenseFF
    kept: torch.Tensor
    dropped: torch.Tensor
    captured: float


@torch.no_grad()
def prune(dense_ffn, neurons: int, calibration_inputs: torch.Tensor, dim_weight: torch.Tensor | None = None,
          token_weight: torch.Tensor | None = None) -> Pruned:
    """A ``DenseFF`` with the ``neurons`` hidden neurons of ``dense_ffn`` of largest mean importance
    on ``calibration_inputs`` (T, in) (``neuron_importance``, error weights ``dim_weight`` (out,) and
    ``token_weight`` (T,) as in ``carve``). Every dropped neuron is replaced by its mean activation:
    its mean contribution is added to the output bias, so ``neurons = hidden`` is exact."""
    dense = as_dense(dense_ffn)
    hidden, d_in = dense.w1.shape
    neurons = check_int("neurons", neurons, 1, hidden)
    x = calibration_inputs.to(torch.float64)
    w1, b1, w2, b2 = (t.detach().to(torch.float64) for t in dense[:4])
    act, imp = neuron_importance(dense._replace(w1=w1, b1=b1, w2=w2, b2=b2), x, dim_weight, token_weight)
    ranked = imp.mean(0).argsort(descending=True)
    kept, dropped = ranked[:neurons], ranked[neurons:]
    layer = DenseFF(d_in, w2.shape[0], neurons, dense.activation).to(torch.float64)
    layer.fc1.weight.copy_(w1[kept])
    layer.fc1.bias.copy_(b1[kept])
    layer.fc2.weight.copy_(w2[:, kept])
    layer.fc2.bias.copy_(b2 + w2[:, dropped] @ act[:, dropped].mean(0))
    captured = float(imp[:, kept].sum() / imp.sum().clamp_min(1e-12))
    return Pruned(layer.to(dense.w1.dtype).eval(), kept, dropped, captured)
