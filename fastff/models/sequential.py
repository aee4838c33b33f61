"""Whole-model conversion: replace the FFN blocks one after another, each fitted on the inputs the
already converted blocks produce (``convert_blocks``), then distil the converted model end to end
against the dense one (``distill_model``).

Fitting every block in isolation on the dense model's inputs lets errors compound through the
layers: block l of the converted model never sees the inputs it was fitted on. ``convert_blocks``
with ``sequential=True`` fits block l on the converted blocks 0..l-1's outputs instead, and with
``target="residual"`` asks it to restore the dense model's residual stream (so it also corrects the
error the earlier blocks left). ``distill_model`` then trains the new layers (FFF leaves with the
routing frozen, or a pruned ``DenseFF``) through the whole model on the final embeddings and
hidden states.

Batches are dicts of model keyword arguments (e.g. a tokenizer's output); tokens whose
``attention_mask`` is 0 are ignored everywhere.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from .._checks import check_choice, check_int
from ..layers.dense import DenseFF
from ..layers.fff import FFF
from ..progress import progress as progress_bar
from .convert import routing_parameters
from .integrate import DenseWeights, ffn_input_module, find_ffn, swap_ffn

__all__ = ["BlockFit", "ffn_inputs", "convert_blocks", "distill_model", "mean_pool"]

TARGETS = ("local", "residual")


class BlockFit(NamedTuple):
    """What ``convert_blocks`` hands ``make_layer`` for one block.

    dense: the block's ``DenseWeights`` (``name`` set); inputs (T, in) and targets (T, out): what
    the new layer sees and should output on the calibration tokens; dim_weight (out,) and
    token_weight (T,) (or None): how much an output error costs downstream, for ``carve`` and
    ``distill`` (BERT blocks: the following LayerNorm scales output k of token t by
    ``gamma_k / sigma_t``, so the weights are ``gamma^2`` and ``1 / sigma_t^2``).
    """
    dense: DenseWeights
    inputs: torch.Tensor
    targets: torch.Tensor
    dim_weight: torch.Tensor | None
    token_weight: torch.Tensor | None


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def _mask(batch: dict) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    return None if m is None else m.bool()


@torch.no_grad()
def ffn_inputs(model: nn.Module, batches: Iterable[dict], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Inputs the FFN blocks ``names`` (default all, see ``find_ffn``) see on ``batches``, non-padding
    tokens only: name -> (T, in). The forward pass stops after the last wanted block's input."""
    blocks = [(n, k) for n, k, _ in find_ffn(model) if names is None or n in names]
    got: dict[str, list] = {n: [] for n, _ in blocks}
    box = {}

    def hook(_mod, args, name, last):
        x = args[0]
        got[name].append((x[box["mask"]] if box["mask"] is not None else x.reshape(-1, x.shape[-1])).clone())
        if last:
            raise _Stop

    hooks = [ffn_input_module(model, n, k).register_forward_pre_hook(
        lambda m, a, n=n, last=(i == len(blocks) - 1): hook(m, a, n, last)) for i, (n, k) in enumerate(blocks)]
    try:
        for batch in batches:
            box["mask"] = _mask(batch)
            try:
                model(**batch)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def convert_blocks(model: nn.Module, batches: list[dict], make_layer: Callable[[BlockFit], nn.Module],
                   sequential: bool = True, target: str = "local", ln_weights: bool = True,
                   progress: bool = True) -> nn.Module:
    """A deep copy of ``model`` with every FFN block replaced by ``make_layer(fit)`` (a ``BlockFit``).

    fit.inputs (T, in): what the block sees on the calibration ``batches`` — in the copy whose
    earlier blocks are already replaced if ``sequential``, else in ``model``; fit.targets (T, out):
    - ``"local"``: ``dense(inputs)``, the dense block on the same inputs;
    - ``"residual"`` (BERT blocks, whose residual is the FFN input): ``dense(x) + x - inputs`` with
      ``x`` the dense model's input to the block, so ``inputs + layer(inputs)``, the sum the
      LayerNorm sees, equals the dense model's.
    ``ln_weights`` (BERT blocks): error weights from the block's output LayerNorm (see ``BlockFit``),
    sigma_t the std of ``inputs + targets``; otherwise (and for other blocks) None.
    ``model`` is left unchanged.
    """
    target = check_choice("target", target, TARGETS)
    blocks = find_ffn(model)
    if target == "residual" and any(k != "bert" for _, k, _ in blocks):
        raise ValueError("target='residual' needs BERT-style blocks (the residual is the FFN input)")
    dense_in = ffn_inputs(model, batches) if target == "residual" or not sequential else {}
    student = copy.deepcopy(model)
    for name, kind, dense in progress_bar(blocks, desc="convert blocks", disable=not progress, leave=False):
        x = ffn_inputs(student, batches, [name])[name] if sequential else dense_in[name]
        with torch.no_grad():
            y = dense(x) if target == "local" else dense_in[name] + dense(dense_in[name]) - x
            dim_w = tok_w = None
            if ln_weights and kind == "bert":
                ln = model.get_submodule(name).output.LayerNorm
                dim_w = ln.weight.detach().square()
                tok_w = 1 / ((x + y).var(1, unbiased=False) + ln.eps)
        layer = make_layer(BlockFit(dense, x, y, dim_w, tok_w))
        if not isinstance(layer, nn.Module):
            raise TypeError(f"make_layer returned {type(layer).__name__} for {name!r}; expected an nn.Module")
        swap_ffn(student, name, kind, layer.eval())
    return student.eval()


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over non-padding tokens, L2-normalised. h (B, S, D), mask (B, S) -> (B, D)."""
    if mask is None:
        return nn.functional.normalize(h.mean(1), dim=-1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


def _outputs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(pooled embedding (B, D), hidden states after every layer [(B, S, D)] * n_layers)."""
    out = model(**batch, output_hidden_states=True)
    return mean_pool(out.last_hidden_state, _mask(batch)), list(out.hidden_states[1:])


def _distill_loss(student: nn.Module, teacher: nn.Module, batch: dict, hidden_weight: float) -> torch.Tensor:
    """``distill_model``'s loss on one batch (differentiable in the student)."""
    with torch.no_grad():
        pool_t, hid_t = _outputs(teacher, batch)
    pool_s, hid_s = _outputs(student, batch)
    loss = (1 - (pool_s * pool_t).sum(-1)).mean()
    if hidden_weight:
        mask = _mask(batch)
        sel = (lambda h: h[mask]) if mask is not None else (lambda h: h.reshape(-1, h.shape[-1]))
        loss = loss + hidden_weight * torch.stack(
            [(sel(s) - sel(t)).square().mean() / sel(t).var() for s, t in zip(hid_s, hid_t)]).mean()
    return loss


def _replaced_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost ``FFF`` / ``DenseFF`` modules of ``model`` (an FFF's master leaf is part of it)."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, (FFF, DenseFF)) and not any(p == "" or name.startswith(f"{p}.") for p, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def distill_model(student: nn.Module, teacher: nn.Module, batches: list[dict], steps: int, lr: float = 1e-4,
                  hidden_weight: float = 1.0, progress: bool = True, seed: int = 0,
                  val_batches: list[dict] | None = None, checks: int = 10) -> dict:
    """Train the replaced FFN layers of ``student`` (every outermost ``fastff.FFF`` or ``DenseFF``: a
    carved or a pruned FFN) in place so its outputs match ``teacher``'s on ``batches``.

    Loss per batch: ``mean(1 - cos(pool_s, pool_t)) + hidden_weight * mean_l MSE(h_s^l, h_t^l) / var(h_t^l)``
    over non-padding tokens, pool = ``mean_pool`` of the last hidden state, h^l the hidden state
    after layer l (HF ``output_hidden_states``). Trained: the parameters of those layers that
    require grad (FFF leaf and master weights, ``carve``'s fixed gate excluded; all of a DenseFF),
    except an FFF's routing hyperplanes, which stay frozen: every step runs the inference function
    (eval-mode hard routing, differentiable in the leaves). The rest of ``student`` (attention,
    LayerNorms, embeddings) stays frozen.
    Adam with a cosine learning-rate decay, one batch per step (cycling through ``batches`` in a
    seeded random order).
    ``val_batches`` (calibration batches not in ``batches``): the loss on them is measured before
    training and ``checks`` times during it, and the student ends with the weights of the lowest
    one (possibly the untrained ones), so distillation never leaves it worse on validation.
    Returns {"loss_first", "loss_last"}: mean loss over the first and last tenth of the steps, and
    with ``val_batches`` also {"val_first", "val_best", "best_step"}.
    """
    steps = check_int("steps", steps, 1)
    if not batches:
        raise ValueError("distill_model needs at least one batch")
    layers = _replaced_layers(student)
    if not layers:
        raise ValueError(f"no fastff.FFF or fastff.DenseFF layer found in {type(student).__name__}")
    params = [p for layer in layers for p in layer.parameters()
              if p.requires_grad and not any(p is q for q in routing_parameters(layer))]
    frozen = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    order = itertools.chain.from_iterable(torch.randperm(len(batches), generator=gen).tolist()
                                          for _ in itertools.count())
    losses, val = [], {}
    check_every = max(1, steps // max(1, checks))
    was_training = student.training
    student.eval()

    def validate(step: int) -> None:
        with torch.no_grad():
            v = sum(_distill_loss(student, teacher, b, hidden_weight).item() for b in val_batches) / len(val_batches)
        val.setdefault("val_first", v)
        if v < val.get("val_best", float("inf")):
            val.update(val_best=v, best_step=step, state=[p.detach().clone() for p in params])

    try:
        if val_batches:
            validate(0)
        bar = progress_bar(range(1, steps + 1), desc="distill model", disable=not progress, leave=False)
        for step, i in zip(bar, order):
            loss = _distill_loss(student, teacher, batches[i], hidden_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if val_batches and (step % check_every == 0 or step == steps):
                validate(step)
        if val_batches:
            with torch.no_grad():
                for p, best in zip(params, val.pop("state")):
                    p.copy_(best)
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
        student.train(was_training)
    tenth = max(1, steps // 10)
    return {"loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth, **val}
