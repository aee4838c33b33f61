"""Find the feedforward blocks of a model and swap in a fast layer (FFF, NeuronTree, ...).

Two kinds of block are recognised:

- ``"bert"``: an HF BERT-family layer, i.e. a module with ``intermediate`` (``.dense`` Linear +
  ``.intermediate_act_fn``) and ``output`` (``.dense`` Linear, ``.dropout``, ``.LayerNorm``).
  The whole ``Linear -> act -> Linear`` is replaced by one layer ``f: hidden -> hidden``:
  ``intermediate`` becomes ``f`` and ``output.dense`` becomes ``nn.Identity``, so
  ``BertOutput`` still applies dropout, the residual ``+ input`` and the LayerNorm untouched,
  and the model's own ``forward`` code (chunking, checkpointing) keeps working unchanged.
- ``"mlp"``: a generic ``Linear -> act -> Linear``: an ``nn.Sequential`` of exactly those three
  modules, a ``fastff.DenseFF``, or any module whose only children are ``fc1`` (Linear), an
  optional activation module (``act``/``activation``) and ``fc2`` (Linear). The block itself
  is replaced in its parent.

The activation is identified numerically (probed against ``fastff.functional.ACTIVATIONS``), so
any module or function computing e.g. exact GELU is recognised as ``"gelu"``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..functional import ACTIVATIONS
from ..layers.dense import DenseFF

__all__ = ["DenseWeights", "Replacement", "replace_ffn", "swap_ffn", "ffn_input_module", "find_ffn", "dense_weights",
           "identify_activation"]

_PROBE = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)


class DenseWeights(NamedTuple):
    """A trained dense FFN ``y = w2 act(w1 x + b1) + b2`` (nn.Linear layout).

    w1 (hidden, in), b1 (hidden,), w2 (out, hidden), b2 (out,); ``activation`` a key of
    ``fastff.functional.ACTIVATIONS``; ``name`` the block's module path (``""`` if unknown).
    The tensors alias the model's parameters: copy before modifying.
    """
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    activation: str
    name: str = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Dense forward. x (..., in) -> (..., out)."""
        return nn.functional.linear(ACTIVATIONS[self.activation](nn.functional.linear(x, self.w1, self.b1)),
                                    self.w2, self.b2)


class Replacement(NamedTuple):
    """One replaced block: module path, kind (``"bert"``/``"mlp"``), shapes, new layer type."""
    name: str
    kind: str
    in_features: int
    hidden: int
    out_features: int
    layer: str


def identify_activation(fn) -> str:
    """Name in ``ACTIVATIONS`` of the elementwise function ``fn`` (module or callable).

    Raises ValueError if ``fn`` matches none of them on a probe grid in [-6, 6].
    """
    with torch.no_grad():
        try:
            got = fn(_PROBE.clone())
        except Exception as exc:  # noqa: BLE001 - any failure means "not an elementwise activation"
            raise ValueError(f"activation {fn!r} could not be evaluated on a probe tensor: {exc}") from exc
        for name, ref in ACTIVATIONS.items():
            if isinstance(got, torch.Tensor) and got.shape == _PROBE.shape and \
                    torch.allclose(got.double(), ref(_PROBE.clone()), atol=1e-6, rtol=1e-6):
                return name
    raise ValueError(f"activation {fn!r} matches none of {sorted(ACTIVATIONS)}")


def _bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _weights(fc1: nn.Linear, act: str, fc2: nn.Linear, name: str) -> DenseWeights:
    if fc1.out_features != fc2.in_features:
        raise ValueError(f"{name}: fc1 has {fc1.out_features} outputs but fc2 expects {fc2.in_features} inputs")
    return DenseWeights(fc1.weight, _bias(fc1), fc2.weight, _bias(fc2), act, name)


def _bert_parts(module: nn.Module):
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if inter is None or out is None:
        return None
    if isinstance(getattr(inter, "dense", None), nn.Linear) and hasattr(inter, "intermediate_act_fn") \
            and isinstance(getattr(out, "dense", None), nn.Linear) and hasattr(out, "LayerNorm"):
        return inter, out
    return None


def _mlp_parts(module: nn.Module):
    """(fc1, activation fn, fc2) if ``module`` is a generic Linear -> act -> Linear, else None."""
    if isinstance(module, DenseFF):
        return module.fc1, ACTIVATIONS[module.activation], module.fc2
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        mods = list(children.values())
        if len(mods) == 3 and isinstance(mods[0], nn.Linear) and isinstance(mods[2], nn.Linear) \
                and not isinstance(mods[1], nn.Linear):
            return mods[0], mods[1], mods[2]
        return None
    fc1, fc2 = children.get("fc1"), children.get("fc2")
    rest = {k: v for k, v in children.items() if k not in ("fc1", "fc2")}
    if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and len(rest) <= 1 \
            and set(rest) <= {"act", "activation"}:
        act = next(iter(rest.values())) if rest else getattr(module, "act", None)
        if act is not None:
            return fc1, act, fc2
    return None


def find_ffn(model: nn.Module) -> list[tuple[str, str, DenseWeights]]:
    """Every feedforward block of ``model``, outermost first: (module path, kind, weights).

    Blocks inside a recognised block are not searched. ``model`` itself is never returned
    (it has no parent to be replaced in); pass its parent instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found, skip = [], []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        bert = _bert_parts(module)
        if bert is not None:
            inter, out = bert
            found.append((name, "bert", _weights(inter.dense, identify_activation(inter.intermediate_act_fn),
                                                 out.dense, name)))
            skip.append(name)
            continue
        mlp = _mlp_parts(module) if name else None
        if mlp is not None:
            fc1, act, fc2 = mlp
            found.append((name, "mlp", _weights(fc1, identify_activation(act), fc2, name)))
            skip.append(name)
    return found


def dense_weights(module: nn.Module) -> DenseWeights:
    """The ``DenseWeights`` of one feedforward block (a DenseFF, an MLP Sequential or a BERT layer)."""
    bert = _bert_parts(module)
    if bert is not None:
        inter, out = bert
        return _weights(inter.dense, identify_activation(inter.intermediate_act_fn), out.dense, "")
    mlp = _mlp_parts(module)
    if mlp is None:
        raise ValueError(f"{type(module).__name__} is not a recognised feedforward block "
                         "(BERT layer, Linear -> act -> Linear Sequential, DenseFF, fc1/act/fc2 module)")
    fc1, act, fc2 = mlp
    return _weights(fc1, identify_activation(act), fc2, "")


def replace_ffn(model: nn.Module, make_layer: Callable[[int, int, int, DenseWeights], nn.Module]) -> list[Replacement]:
    """Swap every feedforward block of ``model`` (in place) for ``make_layer(in, out, hidden, dense)``.

    ``make_layer`` gets the block's widths and its ``DenseWeights`` (with ``name`` set) and must
    return a module mapping (..., in) -> (..., out), e.g. ``fastff.FFF`` or ``carve(...).layer``.
    BERT blocks keep their dropout, residual and LayerNorm (see module docstring).
    Returns one ``Replacement`` per swapped block; ValueError if none is found.
    """
    if not callable(make_layer):
        raise TypeError(f"make_layer must be callable (in_features, out_features, hidden, dense) -> nn.Module, "
                        f"got {type(make_layer).__name__}")
    blocks = find_ffn(model)
    if not blocks:
        raise ValueError(f"no feedforward block found in {type(model).__name__}: expected BERT layers "
                         "(intermediate/output) or Linear -> act -> Linear modules")
    report = []
    for name, kind, dense in blocks:
        hidden, d_in = dense.w1.shape
        d_out = dense.w2.shape[0]
        layer = make_layer(d_in, d_out, hidden, dense)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"make_layer returned {type(layer).__name__} for {name!r}; expected an nn.Module")
        swap_ffn(model, name, kind, layer)
        report.append(Replacement(name, kind, d_in, hidden, d_out, type(layer).__name__))
    return report


def swap_ffn(model: nn.Module, name: str, kind: str, layer: nn.Module) -> None:
    """Put ``layer`` in place of the block ``name`` of kind ``kind`` (as listed by ``find_ffn``)."""
    block = model.get_submodule(name)
    if kind == "bert":
        block.intermediate = layer
        block.output.dense = nn.Identity()
    else:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def ffn_input_module(model: nn.Module, name: str, kind: str) -> nn.Module:
    """The module whose input is the block's FFN input (BERT: ``intermediate``; MLP: the block)."""
    block = model.get_submodule(name)
    return block.intermediate if kind == "bert" else block
