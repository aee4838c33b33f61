"""The feedforward families: one ``Family`` object per kind of feedforward layer, registered by name.

A family knows everything the rest of fastff needs about its layers, so that adding one is one
module plus one ``register`` call:

- how to build the layer from ``(in_features, out_features, width, options)``;
- its option schema (``Option``): defaults, types, allowed values; the CLIs generate their
  ``--option`` flags from it and configs are validated against it, so a bad option is one
  error naming what is allowed;
- its geometry: training width and neurons evaluated per token, from the options alone;
- which usage counting and parameter blocks the local optimisers need (``local_usage``,
  ``local_blocks``), which auxiliary losses its layers record (``aux_losses``), and whether
  int8 dynamic quantization may convert its ``nn.Linear`` layers (``int8``);
- optionally its inference cost per row (``cost``) for the bench's roofline columns.

``FAMILIES`` maps names to families; ``family(name)`` looks one up (aliases included) and
``family_of(module)`` finds the family of a layer instance.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from torch import nn

from .._checks import check_choice
from ..functional import ACTIVATIONS, GATES, fff_depth, hard_path, n_nodes, neuron_tree_walk, tree_routing_logits, tree_size
from .dense import DenseFF
from .fff import FFF
from .moe import MOE_GATES, MoE
from .neuron_tree import NeuronTree
from .product_key import ProductKeyFF


@dataclass(frozen=True)
class Option:
    """One constructor option of a family: name (``snake_case``; the CLI flag is ``--kebab-case``),
    type (int, float, str or bool), default (None: derived from the width, see the family),
    allowed ``choices`` or the closed range [``low``, ``high``] for numbers, and help text."""
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None

    def check(self, family: str, value):
        """``value`` converted to this option's type, or ValueError naming what is allowed."""
        where = f"{family} option {self.name!r}"
        if value is None and self.default is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            return value
        if self.type is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ValueError(f"{where} must be an integer{self._span()}, got {value!r}")
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{where} must be a number{self._span()}, got {value!r}")
            value = float(value)
        if self.type is str and not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        value = self.type(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, self.choices))}; got {value!r}")
        if (self.low is not None and not value >= self.low) or (self.high is not None and not value <= self.high):
            raise ValueError(f"{where} must be{self._span()}, got {value!r}")
        return value

    def _span(self) -> str:
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f" >= {self.low}"
        return f" in [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Geometry:
    """Hidden neurons a layer trains (``training_width``) and evaluates per token at inference."""
    training_width: int
    neurons_per_token: int


class Routing(NamedTuple):
    """Where the rows of a batch go in eval mode, level by level (root first): ``units[t]``
    (B, k) long, the index within level t of the unit each row reaches (k per row: one per
    tree, numbered tree-major, or the top-k experts); ``logits[t]`` (B, k) the decision pre-activations there (sign = branch),
    or None for levels decided otherwise (a router's top-k). ``sizes[t]``: units in level t."""
    units: list
    logits: list
    sizes: list


@dataclass(frozen=True)
class Family:
    """A kind of feedforward layer (see the module docstring).

    ``make(in_features, out_features, width, options, **runtime)`` builds the layer from complete,
    checked options (``runtime``: ``usage`` / ``backend`` for layers that take them);
    ``shape(width, options) -> Geometry``; ``local_blocks``: (usage buffer, parameter names whose
    leading dims that buffer indexes) per block kind; ``cost(dim, options, width)`` of a layer
    ``dim -> dim``: (weight elements a row touches, FLOPs per row, fn(batch) -> distinct weight
    elements a batch touches under uniform routing), or None when unknown; ``routing(layer, x
    (B, in))`` -> ``Routing`` of a routed family (what the capacity diagnostics count);
    ``sized(depth, options)`` -> (width, options) of the layer of that depth (size sweeps);
    ``cpu_kernel(layer)`` -> (``kernels.cpu`` function ``f(x, *weights, activation)``, its numba
    part ``run(x_np, weights_np, activation code, out_np)``, the layer's weight tensors).
    """
    name: str
    layer: type
    options: tuple[Option, ...]
    make: Callable[..., nn.Module]
    shape: Callable[[int, dict], Geometry]
    help: str
    local_usage: str | None = None
    local_blocks: tuple = ()
    aux_losses: tuple[str, ...] = ()
    int8: bool = False
    backends: bool = False
    cost: Callable | None = None
    routing: Callable[[nn.Module, "torch.Tensor"], Routing] | None = None
    sized: Callable[[int, dict], tuple[int, dict]] | None = None
    cpu_kernel: Callable[[nn.Module], tuple] | None = None
    aliases: tuple[str, ...] = ()
    check_width: Callable[[int, dict], None] | None = None

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def resolve(self, width: int, options: dict | None = None, defaults: dict | None = None) -> dict:
        """Complete, checked options: ``options`` (unknown names are an error naming the allowed
        ones), then the caller's ``defaults`` for the options this family has, then the family's
        own defaults; width-dependent defaults (None) are filled in, and the width is checked."""
        options = dict(options or {})
        unknown = sorted(set(options) - {o.name for o in self.options})
        if unknown:
            allowed = ", ".join(o.name for o in self.options) or "none"
            raise ValueError(f"unknown {self.name} option(s) {', '.join(map(repr, unknown))}; "
                             f"{self.name} takes: {allowed}")
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ValueError(f"{self.name} width must be an integer >= 1, got {width!r}")
        defaults = defaults or {}
        out = {}
        for o in self.options:
            value = options[o.name] if o.name in options else defaults.get(o.name, o.default)
            out[o.name] = o.check(self.name, value)
        if self.check_width is not None:
            self.check_width(int(width), out)
        return out

    def build(self, in_features: int, out_features: int, width: int, options: dict | None = None,
              **runtime) -> nn.Module:
        """The layer ``(..., in_features) -> (..., out_features)`` of this family."""
        return self.make(in_features, out_features, int(width), self.resolve(width, options), **runtime)

    def geometry(self, width: int, options: dict | None = None) -> Geometry:
        """Training width and neurons per token, without building the layer."""
        return self.shape(int(width), self.resolve(width, options))


FAMILIES: dict[str, Family] = {}
_ALIASES: dict[str, str] = {}


def register(fam: Family) -> Family:
    """Add ``fam`` to ``FAMILIES`` (its name and aliases must be new; an option name shared with
    another family must have the same type there, since the CLIs declare one flag per name)."""
    for name in (fam.name, *fam.aliases):
        if name in FAMILIES or name in _ALIASES:
            raise ValueError(f"a feedforward family named {name!r} is already registered")
    for o in fam.options:
        for other in FAMILIES.values():
            same = other.option(o.name)
            if same is not None and same.type is not o.type:
                raise ValueError(f"option {o.name!r} of {fam.name!r} is {o.type.__name__}, but "
                                 f"{other.name!r} declares it {same.type.__name__}")
    FAMILIES[fam.name] = fam
    _ALIASES.update({a: fam.name for a in fam.aliases})
    return fam


def unregister(name: str) -> None:
    """Remove a family (tests that register a temporary one)."""
    fam = FAMILIES.pop(name)
    for a in fam.aliases:
        _ALIASES.pop(a, None)


def family(name: str) -> Family:
    """The family registered as ``name`` (or an alias); ValueError listing the names."""
    name = _ALIASES.get(name, name)
    if name not in FAMILIES:
        check_choice("ffn", name, tuple(FAMILIES))
    return FAMILIES[name]


def family_of(module: nn.Module) -> Family | None:
    """The family whose layer class ``module`` is an instance of (None for other modules)."""
    return next((f for f in FAMILIES.values() if isinstance(module, f.layer)), None)


def feedforwards(model: nn.Module) -> list[nn.Module]:
    """The outermost feedforward layers of ``model`` (a layer nested in another, e.g. an FFF's
    master leaf, counts as part of the outer one), in module order."""
    if family_of(model) is not None:
        return [model]
    return [m for child in model.children() for m in feedforwards(child)]


def make_ffn(kind: str, in_features: int, out_features: int, width: int, **options) -> nn.Module:
    """A feedforward layer of family ``kind`` and training width ``width``; ``options`` are the
    family's (``FAMILIES[kind].options``), plus ``usage`` / ``backend`` where the layer takes them."""
    fam = family(kind)
    runtime = {k: options.pop(k) for k in ("usage", "backend") if k in options}
    return fam.build(in_features, out_features, width, options, **runtime)


# ----------------------------------------------------------------------------- the built-in families

def _activation(default: str) -> Option:
    return Option("activation", str, default, "hidden activation", choices=tuple(ACTIVATIONS))


def _leaves(width: int, leaf: int, kind: str) -> int:
    """``width / leaf``, which must be a power of two."""
    ratio = width // leaf
    if width % leaf or ratio & (ratio - 1):
        raise ValueError(f"{kind} width must be leaf times a power of two; got width={width}, leaf={leaf}")
    return ratio


def _fff_leaf(width: int) -> int:
    """The smallest leaf width >= 8 leaving a power-of-two number of leaves (3072 -> 12, 1024 -> 8)."""
    return next((leaf for leaf in range(8, width + 1) if width % leaf == 0 and (width // leaf) & (width // leaf - 1) == 0),
                width)


def _fff_check(width: int, o: dict) -> None:
    if o["leaf"] is None:
        o["leaf"] = _fff_leaf(width)
    _leaves(width, o["leaf"], "fff")


def _fff_make(i, out, width, o, **runtime):
    depth = fff_depth(_leaves(width, o["leaf"], "fff"))
    return FFF(i, out, depth, o["leaf"], activation=o["activation"], dropout=o["leaf_dropout"],
               region_leak=o["region_leak"], train_hardened=o["train_hardened"],
               master_leaf=None if o["master_leaf"] == "none" else o["master_leaf"],
               master_width=o["master_width"], train_mode=o["train_mode"], **runtime)


def _fff_shape(width, o) -> Geometry:
    depth = fff_depth(_leaves(width, o["leaf"], "fff"))
    master = 0 if o["master_leaf"] == "none" else (o["master_width"] or o["leaf"]) + (o["master_leaf"] == "token")
    return Geometry(width, depth + o["leaf"] + master)


def _fff_cost(dim: int, o: dict, width: int):
    depth, leaf = fff_depth(_leaves(width, o["leaf"], "fff")), o["leaf"]
    leaf_elems = 2 * dim * leaf + leaf + dim

    def unique(batch):
        return sum(_touched(1 << t, batch) for t in range(depth)) * (dim + 1) + _touched(1 << depth, batch) * leaf_elems

    return depth * (dim + 1) + leaf_elems, 2 * depth * dim + 4 * dim * leaf, unique


def _touched(n: int, batch: int) -> float:
    """Expected distinct items of n drawn by ``batch`` uniform draws: n·(1 - (1 - 1/n)^batch)."""
    return n * -math.expm1(batch * math.log1p(-1 / n)) if n > 1 else float(batch > 0)


def _fff_routing(layer, x) -> Routing:
    path = hard_path(x, layer.node_w, layer.node_b, layer.depth)
    units = [path.nodes[:, t:t + 1] - n_nodes(t) for t in range(layer.depth)] + [path.leaf[:, None]]
    logits = [path.logits[:, t:t + 1] for t in range(layer.depth)] + [None]
    return Routing(units, logits, [1 << t for t in range(layer.depth + 1)])


def _tree_routing(layer, x) -> Routing:
    route_bias = layer.routed_options().get("route_bias")
    nodes, acts = neuron_tree_walk(x, layer.w_in, layer.b_in, layer.depth, route_bias)    # (B, K, D+1)
    logits = tree_routing_logits(acts, nodes, route_bias)                                 # the decisions
    levels, tree = range(layer.depth + 1), torch.arange(layer.trees, device=x.device)
    return Routing([nodes[..., t] - n_nodes(t) + tree * (1 << t) for t in levels], [logits[..., t] for t in levels],
                   [layer.trees << t for t in levels])


def _moe_routing(layer, x) -> Routing:
    return Routing([layer.router(x).topk(layer.k, dim=-1).indices], [None], [layer.experts])


def _fff_kernel(layer):
    from ..kernels import cpu

    run = lambda xa, weights, code, out: cpu.fff_run(xa, weights, code, False, out)
    return cpu.fff_hard, run, (layer.node_w, layer.node_b, layer.w1, layer.b1, layer.w2, layer.b2)


def _tree_kernel(layer):
    from ..kernels import cpu

    if layer.routed_options() or layer.dense is not None:
        raise ValueError(f"the numba neuron-tree kernel computes a plain tree; this layer uses route_bias, gate or "
                         f"dense_slice ({layer.extra_repr()})")
    return cpu.neuron_tree, cpu.neuron_tree_run, (layer.w_in, layer.b_in, layer.w_out, layer.b_out)


def _tree_depth(width: int, o: dict) -> int:
    trees_width = width - o["dense_slice"]
    return o["depth"] if o["depth"] is not None else (trees_width // o["trees"] + 1).bit_length() - 2


def _tree_check(width: int, o: dict) -> None:
    if o["depth"] is None and width - o["dense_slice"] < o["trees"]:
        raise ValueError(f"neuron-tree width must be >= trees + dense_slice (one root per tree), got width={width}, "
                         f"trees={o['trees']}, dense_slice={o['dense_slice']}")


def _tree_make(i, out, width, o, **runtime):
    return NeuronTree(i, out, _tree_depth(width, o), o["trees"], activation=o["activation"], bias=o["bias"],
                      route_bias=o["route_bias"], gate=o["gate"], dense_slice=o["dense_slice"], **runtime)


def _tree_shape(width, o) -> Geometry:
    depth = _tree_depth(width, o)
    return Geometry(o["trees"] * tree_size(depth) + o["dense_slice"], o["trees"] * (depth + 1) + o["dense_slice"])


def _tree_cost(dim: int, o: dict, width: int):
    depth, trees, dense = _tree_depth(width, o), o["trees"], o["dense_slice"]
    used = trees * (depth + 1)
    dense_elems = dense * (2 * dim + 1) + (dim if dense else 0)

    def unique(batch):
        return trees * sum(_touched(1 << t, batch) for t in range(depth + 1)) * (2 * dim + 1) + dim + dense_elems

    return (used * (2 * dim + 1) + dim + dense_elems, 4 * (used + dense) * dim, unique)


def _moe_check(width: int, o: dict) -> None:
    if o["leaf"] is None:
        o["leaf"] = max(1, width // 16)
    experts = _leaves(width, o["leaf"], "moe")
    if o["top_k"] > experts:
        raise ValueError(f"moe top_k must be <= experts = width / leaf = {experts}, got top_k={o['top_k']}")


def _moe_make(i, out, width, o, **runtime):
    return MoE(i, out, width // o["leaf"], o["leaf"], o["top_k"], o["activation"], o["gate"], **runtime)


def _dense_make(i, out, width, o, **runtime):
    return DenseFF(i, out, width, o["activation"], **runtime)


LEAF = Option("leaf", int, None, "FFF leaf width / MoE expert width (default: FFF the smallest >= 8 leaving a "
                                 "power-of-two number of leaves, MoE width/16)", low=1)

register(Family(
    "dense", DenseFF, (_activation("gelu"),), _dense_make,
    lambda width, o: Geometry(width, width), "Linear -> activation -> Linear of width hidden neurons",
    int8=True, aliases=("ff",)))

register(Family(
    "fff", FFF,
    (LEAF, _activation("relu"),
     Option("train_mode", str, "soft", "training forward: soft mixture or hard_path (one leaf per row)",
            choices=("soft", "hard_path")),
     Option("master_leaf", str, "none", "always-on dense leaf blended by one scalar or per-token gate",
            choices=("none", "scalar", "token")),
     Option("master_width", int, None, "master leaf width (default: leaf)", low=1),
     Option("region_leak", float, 0.0, "probability of swapping a node decision in training", low=0.0, high=0.5),
     Option("leaf_dropout", float, 0.0, "dropout on the leaf hidden units", low=0.0, high=1.0),
     Option("train_hardened", bool, False, "hard decisions in training too")),
    _fff_make, _fff_shape, "binary tree of decision neurons over leaf MLPs (Belcak & Wattenhofer)",
    local_usage="soft", local_blocks=(("leaf_usage", ("w1", "b1", "w2", "b2")), ("node_usage", ("node_w", "node_b"))),
    aux_losses=("hardening", "balance"), backends=True, cost=_fff_cost, routing=_fff_routing, check_width=_fff_check, cpu_kernel=_fff_kernel,
    sized=lambda depth, o: ((o.get("leaf") or 8) << depth, o)))

register(Family(
    "neuron-tree", NeuronTree,
    (Option("trees", int, 1, "parallel trees K", low=1),
     Option("depth", int, None, "tree depth D (default: the largest with trees * (2^(D+1) - 1) <= width - dense_slice)", low=0),
     _activation("gelu"),
     Option("bias", bool, True, "input bias of every neuron"),
     Option("route_bias", float, 0.0, "update rate of a per-node routing offset that each training step moves "
                                      "towards 50/50 splits (0 = off; runs on the torch backend)", low=0.0),
     Option("gate", str, "none", "path: scale each visited neuron by the probability of its path, so routing "
                                 "gets a gradient (runs on the torch backend); straight-through: that gradient "
                                 "with the plain tree's forward (serves a plain tree)", choices=GATES),
     Option("dense_slice", int, 0, "width of an always-on dense FFN added to the trees (counted in the width)",
            low=0)),
    _tree_make, _tree_shape, "K trees in which every node is a neuron (UltraFastBERT)",
    local_usage="hard", local_blocks=(("neuron_usage", ("w_in", "b_in", "w_out")),), aux_losses=("node_balance",),
    backends=True, cost=_tree_cost, routing=_tree_routing, check_width=_tree_check, cpu_kernel=_tree_kernel,
    sized=lambda depth, o: (o.get("trees", 1) * tree_size(depth) + o.get("dense_slice", 0), {**o, "depth": depth})))

register(Family(
    "moe", MoE,
    (LEAF, Option("top_k", int, 1, "experts per row", low=1), _activation("gelu"),
     Option("gate", str, "softmax", "softmax: weight the chosen experts by their router probabilities (Switch); "
                                    "straight-through: 1/k each in value, the router's gradient kept",
            choices=MOE_GATES)),
    _moe_make, lambda width, o: Geometry(width, width // o["leaf"] + o["top_k"] * o["leaf"]),
    "top-k mixture of width/leaf experts of leaf neurons", aux_losses=("balance",), routing=_moe_routing,
    check_width=_moe_check))


# ----------------------------------------------------------------------------- product-key

def _pk_keys(width: int) -> int:
    """n_keys of a product-key layer of ``width = n_keys**2`` experts."""
    n = math.isqrt(width)
    if n * n != width:
        raise ValueError(f"product-key width must be a perfect square n_keys**2 (one expert per pair of sub-keys), "
                         f"got {width}; the nearest are {n * n} and {(n + 1) ** 2}")
    return n


def _pk_check(width: int, o: dict) -> None:
    n = _pk_keys(width)
    if o["top_k"] > n:
        raise ValueError(f"product-key top_k must be <= n_keys = sqrt(width) = {n}, got top_k={o['top_k']}")
    if o["key_dim"] % 2:
        raise ValueError(f"product-key key_dim must be even (queries split into two halves), got {o['key_dim']}")


def _pk_make(i, out, width, o, **runtime):
    return ProductKeyFF(i, out, _pk_keys(width), heads=o["key_heads"], top_k=o["top_k"], key_dim=o["key_dim"],
                        activation=o["activation"], query_norm=o["query_norm"], **runtime)


def _pk_shape(width, o) -> Geometry:
    return Geometry(width, o["key_heads"] * (o["top_k"] + o["key_dim"] + _pk_keys(width)))


def _pk_cost(dim: int, o: dict, width: int):
    H, k, D, n = o["key_heads"], o["top_k"], o["key_dim"], _pk_keys(width)
    routing = H * D * dim + H * n * D                                  # query weights + sub-keys

    def unique(batch):
        return routing + _touched(width, batch * H * k) * 2 * dim + dim

    return routing + H * k * 2 * dim + dim, 2 * routing + 4 * H * k * dim, unique


def _pk_routing(layer, x) -> Routing:
    return Routing([layer.select(x)[1].reshape(x.shape[0], -1)], [None], [layer.experts])


register(Family(
    "product-key", ProductKeyFF,
    (Option("key_heads", int, 4, "product-key query heads", low=1),
     Option("top_k", int, 8, "experts per row (product-key: per head, also the sub-keys kept per half)", low=1),
     Option("key_dim", int, 32, "product-key query width (even: two halves of sub-key width)", low=2),
     _activation("gelu"),
     Option("query_norm", str, "layer", "product-key query normalisation (batch: eval uses running statistics)",
            choices=("layer", "batch", "none"))),
    _pk_make, _pk_shape, "width = n_keys**2 single-neuron experts chosen by product keys (PEER)",
    cost=_pk_cost, routing=_pk_routing, check_width=_pk_check))
