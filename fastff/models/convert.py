"""Carve an FFF out of a trained dense FFN (no training from scratch), then distil it.

``carve`` follows the MoEfication / CMoE idea: the dense FFN's hidden neurons are grouped into
``2**depth`` leaves of ``leaf_width`` neurons each, and every decision node gets a hyperplane that
sends a token to the subtree whose neurons matter most for it. The grouping and the routing are
found together, top-down, by co-clustering on calibration tokens:

- importance of neuron j for token t: ``(a_tj - mean_t a_tj)^2 * ||w2[:, j]||^2``, the squared
  output error of replacing the neuron by its mean activation (what a leaf does with the neurons
  it does not hold, see below);
- optional master group: the ``master`` neurons of largest mean importance become an always-on
  dense leaf (FFF ``master_leaf="scalar"`` with the gate frozen at 0.5, see ``carve``);
- if ``2**depth * leaf_width`` is smaller than the remaining neurons, the least important
  (by mean importance) are dropped; their mean contribution is folded into the leaf biases;
- at each node (neurons S, tokens T reaching it) alternate a few times: split S into two equal
  halves by how much more each neuron matters on the tokens routed left than on those routed
  right; label each token by the half that holds more of its importance; fit the node's
  hyperplane by logistic regression on the FFN inputs (tokens weighted by how much importance
  their side choice moves); reroute T by the hyperplane. Children get the tokens the hyperplane
  actually sends them, so deeper splits are fitted on the routing the layer will really use.
- each leaf's output bias is the dense ``b2`` plus the mean contribution, over the calibration
  tokens routed to that leaf, of the neurons the leaf does not hold (zero when nothing is left out).

``distill`` then refits each leaf's output weights by ridge least squares on its routed tokens
(closed form) and optionally trains all leaf and master weights with Adam to match the dense
outputs, with the routing frozen (hard decisions, as at inference).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .._checks import check_int
from ..functional import ACTIVATIONS, go_right, hard_path, left_child, n_nodes
from ..layers.dense import DenseFF
from ..layers.fff import FFF
from ..progress import progress as progress_bar
from .integrate import DenseWeights, dense_weights

__all__ = ["Carved", "carve", "distill", "route_leaves", "neuron_importance", "as_dense", "routing_parameters"]


class Carved(NamedTuple):
    """Result of ``carve``.

    layer: the FFF; leaf_neurons (L, leaf_width) long: dense neuron indices of each leaf
    (leaf order = heap leaf index); master_neurons (master,) long; dropped_neurons (k,) long;
    captured: fraction of the calibration tokens' total importance held by their routed leaf
    (plus master), a quality proxy in [0, 1]; leaf_share (L,): fraction of calibration tokens
    routed to each leaf.
    """
    layer: FFF
    leaf_neurons: torch.Tensor
    master_neurons: torch.Tensor
    dropped_neurons: torch.Tensor
    captured: float
    leaf_share: torch.Tensor


def as_dense(dense) -> DenseWeights:
    """``dense`` as ``DenseWeights`` (a DenseWeights, or a feedforward module read by ``dense_weights``)."""
    if isinstance(dense, DenseWeights):
        return dense
    if isinstance(dense, nn.Module):
        return dense_weights(dense)
    raise TypeError(f"dense_ffn must be a DenseWeights or a feedforward nn.Module, got {type(dense).__name__}")


@torch.no_grad()
def neuron_importance(dense: DenseWeights, x: torch.Tensor, dim_weight: torch.Tensor | None = None,
                      token_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden activations and per-token neuron importance. x (T, in) -> (act (T, H), imp (T, H)).

    A neuron left out of a token's leaf is replaced by its mean activation, so what leaving it
    out costs is its deviation from the mean: ``imp = (a - mean_T a)^2 * ||w2[:, j]||^2`` (the
    squared output error it adds, up to cross terms between neurons). With error weights (see
    ``distill``) the squared error is weighted: ``token_weight_t * sum_k dim_weight_k w2[k, j]^2``.
    """
    a = ACTIVATIONS[dense.activation](x @ dense.w1.T.to(x.dtype) + dense.b1.to(x.dtype))
    w2sq = dense.w2.to(x.dtype).square()
    imp = (a - a.mean(0)).square() * (w2sq.sum(0) if dim_weight is None else dim_weight.to(x.dtype) @ w2sq)
    return a, imp if token_weight is None else imp * token_weight.to(x.dtype)[:, None]


def _fit_hyperplane(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, l2: float, iters: int):
    """Weighted L2-regularised logistic regression. x (T, in), y (T,) bool, weight (T,) -> (w (in,), b)."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mu) / sd).float()                                       # float32 is plenty here
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    target = y.float()
    weight = (weight / weight.sum().clamp_min(1e-12)).float()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logit = z @ w + b
        loss = (weight * (nn.functional.softplus(logit) - target * logit)).sum()  # weighted logistic loss
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach().to(x.dtype) / sd, b.detach().to(x.dtype)
    return w, b - (w * mu).sum()


def _balanced_assign(score: torch.Tensor, cap: int) -> torch.Tensor:
    """Give each of n items one of k bins (capacity ``cap``, n <= k * cap), greedily taking the
    highest remaining (item, bin) score. score (n, k) -> (n,) long."""
    n, k = score.shape
    label, fill, left = [-1] * n, [0] * k, n
    for flat in score.flatten().argsort(descending=True).tolist():
        i, c = divmod(flat, k)
        if label[i] < 0 and fill[c] < cap:
            label[i], fill[c], left = c, fill[c] + 1, left - 1
            if not left:
                break
    return torch.tensor(label, dtype=torch.long)


def _cluster_neurons(imp: torch.Tensor, k: int, cap: int, iters: int = 15, max_tokens: int = 2048) -> torch.Tensor:
    """Balanced spherical k-means of neurons on their normalised importance profiles (co-activation).

    imp (T, n) with n == k * cap -> cluster label (n,) long, every cluster holding ``cap`` neurons.
    """
    n = imp.shape[1]
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    step = max(1, imp.shape[0] // max_tokens)
    prof = imp[::step].T.float()                                     # (n, t)
    prof = prof / prof.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # deterministic farthest-point seeding
    seeds = [int(imp.sum(0).argmax())]
    for _ in range(k - 1):
        seeds.append(int((prof @ prof[seeds].T).max(1).values.argmin()))
    cent = prof[seeds]
    label = None
    for _ in range(iters):
        new = _balanced_assign(prof @ cent.T, cap)
        if label is not None and torch.equal(new, label):
            break
        label = new
        cent = nn.functional.one_hot(label, k).to(prof.dtype).T @ prof
        cent = cent / cent.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return label


def _bisect(m: torch.Tensor, max_tokens: int = 8192) -> torch.Tensor:
    """Split c (even) groups into two halves so each token's captured importance on its better side
    is large. m (t, c) importance each token puts on each group -> right (c,) bool, c/2 True.

    Spectral start (Fiedler vector of the groups' co-activation graph), then best-pair swaps.
    """
    c = m.shape[1]
    right = torch.zeros(c, dtype=torch.bool)
    if c == 2 or m.shape[0] == 0:
        right[c // 2:] = True
        return right
    m = m[:: max(1, m.shape[0] // max_tokens)]
    share = m / m.sum(1, keepdim=True).clamp_min(1e-12)
    aff = share.T @ share
    aff.fill_diagonal_(0)
    fiedler = torch.linalg.eigh(torch.diag(aff.sum(1)) - aff).eigenvectors[:, 1]
    right[fiedler.argsort()[c // 2:]] = True
    total = m.sum(1)

    def value(s_right):  # (t, ...) -> summed better-side capture
        return torch.maximum(s_right, total.view(-1, *([1] * (s_right.dim() - 1))) - s_right).sum(0)

    for _ in range(c):
        s_r = m[:, right].sum(1)
        li, ri = (~right).nonzero()[:, 0], right.nonzero()[:, 0]
        swapped = s_r[:, None, None] + m[:, li, None] - m[:, None, ri]  # move li right, ri left
        gains = value(swapped) - value(s_r)
        best = int(gains.argmax())
        if gains.flatten()[best] <= 1e-9 * value(s_r):
            break
        a, b = divmod(best, ri.numel())
        right[li[a]], right[ri[b]] = True, False
    return right


def _fit_node(xt: torch.Tensor, cap_left: torch.Tensor, cap_right: torch.Tensor, l2: float, iters: int):
    """Hyperplane sending each token to the side holding more of its importance.
    xt (t, in), cap_* (t,) -> (w (in,), b (), right (t,) bool as routed by the hyperplane)."""
    zero = torch.zeros(xt.shape[1], dtype=xt.dtype)
    margin = cap_right - cap_left
    label = margin >= 0
    if xt.shape[0] == 0 or label.all() or (~label).all():
        b = torch.tensor(1.0 if xt.shape[0] == 0 or bool(label[0]) else -1.0, dtype=xt.dtype)
        return zero, b, torch.full((xt.shape[0],), bool(b > 0))
    w, b = _fit_hyperplane(xt, label, margin.abs() + 1e-3 * margin.abs().mean(), l2, iters)
    return w, b, go_right(xt @ w + b)


def _grow(x, cap, order, depth, l2, iters):
    """Fit every node top-down. cap (T, c) importance per group; ``order`` None: choose the group
    bisections (spectral + swaps) while growing; else (L,) group of each leaf, fixed.
    Returns (node_w (N, in), node_b (N,), leaf_group (L,) long, leaf_of_token (T,) long)."""
    n_leaves = 1 << depth
    node_w = x.new_zeros(n_leaves - 1, x.shape[1])
    node_b = x.new_zeros(n_leaves - 1)
    groups = {0: (torch.arange(cap.shape[1]) if order is None else order, torch.arange(x.shape[0]))}
    for node in range(n_leaves - 1):
        gids, tokens = groups.pop(node)
        m = cap[tokens][:, gids]
        half = gids.numel() // 2
        right_g = _bisect(m) if order is None else torch.arange(gids.numel()) >= half
        w, b, right = _fit_node(x[tokens], m[:, ~right_g].sum(1), m[:, right_g].sum(1), l2, iters)
        node_w[node], node_b[node] = w, b
        left = left_child(node)
        groups[left] = (gids[~right_g], tokens[~right])
        groups[left + 1] = (gids[right_g], tokens[right])
    leaf_of_token = torch.empty(x.shape[0], dtype=torch.long)
    leaf_group = torch.empty(n_leaves, dtype=torch.long)
    for leaf in range(n_leaves):
        gids, tokens = groups[n_nodes(depth) + leaf]
        leaf_group[leaf] = gids[0]
        leaf_of_token[tokens] = leaf
    return node_w, node_b, leaf_group, leaf_of_token


@torch.no_grad()
def carve(dense_ffn, depth: int, leaf_width: int, calibration_inputs: torch.Tensor, master: int = 0,
          rounds: int = 2, l2: float = 1e-3, lbfgs_iters: int = 20, dim_weight: torch.Tensor | None = None,
          token_weight: torch.Tensor | None = None) -> Carved:
    """Build an FFF from a trained dense FFN without training from scratch (see module docstring).

    dense_ffn: ``DenseWeights`` or a feedforward module (DenseFF, MLP Sequential, BERT layer) with
    w1 (hidden, in); calibration_inputs (T, in): inputs the FFN sees on calibration data.
    Requires ``master + 2**depth * leaf_width <= hidden``; neurons beyond that are dropped
    (least important first). With ``master > 0`` the FFF gets ``master_leaf="scalar"``, the gate
    parameter frozen at 0 (g = 0.5, ``requires_grad=False``) and tree/master output weights
    doubled, so the layer computes ``tree(x) + master(x)`` exactly. ``dim_weight`` (out,) and
    ``token_weight`` (T,): error weights of the importance (see ``neuron_importance``, ``distill``).
    """
    dense = as_dense(dense_ffn)
    hidden, d_in = dense.w1.shape
    d_out = dense.w2.shape[0]
    depth = check_int("depth", depth, 0, 20)
    leaf_width = check_int("leaf_width", leaf_width, 1, hidden)
    master = check_int("master", master, 0, hidden - 1)
    n_leaves = 1 << depth
    if master + n_leaves * leaf_width > hidden:
        raise ValueError(f"master + 2**depth * leaf_width must be <= hidden = {hidden}, got "
                         f"{master} + {n_leaves} * {leaf_width} = {master + n_leaves * leaf_width}")
    if not isinstance(calibration_inputs, torch.Tensor) or calibration_inputs.dim() != 2 \
            or calibration_inputs.shape[1] != d_in or calibration_inputs.shape[0] < 1:
        raise ValueError(f"calibration_inputs must be a tensor of shape (T >= 1, {d_in}), got "
                         f"{getattr(calibration_inputs, 'shape', type(calibration_inputs).__name__)}")
    dtype = dense.w1.dtype
    x = calibration_inputs.to(torch.float64)
    w1, b1, w2, b2 = (t.detach().to(torch.float64) for t in dense[:4])
    act, imp = neuron_importance(DenseWeights(w1, b1, w2, b2, dense.activation), x, dim_weight, token_weight)
    mean_imp = imp.mean(0)
    ranked = mean_imp.argsort(descending=True)
    master_idx = ranked[:master]
    kept = ranked[master:master + n_leaves * leaf_width]
    dropped = ranked[master + n_leaves * leaf_width:]

    imp_kept = imp[:, kept]                                          # (T, n_kept)

    def capture(label):  # (T, L) importance each token puts on each group
        return imp_kept @ nn.functional.one_hot(label, n_leaves).to(imp.dtype)

    label = _cluster_neurons(imp_kept, n_leaves, leaf_width)
    node_w, node_b, leaf_group, leaf_of_token = _grow(x, capture(label), None, depth, l2, lbfgs_iters)
    label = torch.argsort(leaf_group)[label]                         # group id -> leaf id
    best = None
    for r in range(rounds + 1):
        cap = capture(label)
        score = float(cap.gather(1, leaf_of_token[:, None]).sum())
        if best is None or score > best[0]:
            best = (score, label, node_w, node_b, leaf_of_token)
        if r == rounds:
            break
        # neurons move to the leaves whose routed tokens they matter most for; then refit routing
        per_leaf = nn.functional.one_hot(leaf_of_token, n_leaves).to(imp.dtype).T @ imp_kept  # (L, n_kept)
        new = _balanced_assign(per_leaf.T, leaf_width)
        if torch.equal(new, label):
            break
        label = new
        node_w, node_b, _, leaf_of_token = _grow(x, capture(label), torch.arange(n_leaves), depth, l2,
                                                 lbfgs_iters)
    _, label, node_w, node_b, leaf_of_token = best
    leaf_neurons = torch.stack([kept[label == leaf] for leaf in range(n_leaves)])  # (L, H)

    scale = 2.0 if master else 1.0                                   # undo the frozen 0.5 gate
    fff = FFF(d_in, d_out, depth, leaf_width, activation=dense.activation,
              master_leaf="scalar" if master else None, master_width=master or None).to(torch.float64)
    fff.node_w.copy_(node_w)
    fff.node_b.copy_(node_b)
    fff.w1.copy_(w1[leaf_neurons].transpose(1, 2))                  # (L, in, H)
    fff.b1.copy_(b1[leaf_neurons])
    fff.w2.copy_(scale * w2[:, leaf_neurons].permute(1, 2, 0))      # (L, H, out)
    captured = imp[:, master_idx].sum()
    for leaf in range(n_leaves):
        held, tokens = leaf_neurons[leaf], (leaf_of_token == leaf).nonzero()[:, 0]
        out_of_leaf = torch.ones(hidden, dtype=torch.bool)
        out_of_leaf[held] = False
        out_of_leaf[master_idx] = False
        mean_act = (act[tokens] if tokens.numel() else act).mean(0)
        missing = w2[:, out_of_leaf] @ mean_act[out_of_leaf]
        fff.b2[leaf] = scale * ((0.0 if master else b2) + missing)
        captured += imp[tokens][:, held].sum()
    if master:
        fff.master.fc1.weight.copy_(w1[master_idx])
        fff.master.fc1.bias.copy_(b1[master_idx])
        fff.master.fc2.weight.copy_(scale * w2[:, master_idx])
        fff.master.fc2.bias.copy_(scale * b2)
        fff.gate.zero_()
        fff.gate.requires_grad_(False)
    return Carved(fff.to(dtype).eval(), leaf_neurons, master_idx, dropped,
                  float(captured / imp.sum().clamp_min(1e-12)),
                  torch.bincount(leaf_of_token, minlength=n_leaves).float() / x.shape[0])


def route_leaves(layer: FFF, x: torch.Tensor) -> torch.Tensor:
    """Hard leaf index of each row. x (T, in) -> (T,) long."""
    with torch.no_grad():
        return hard_path(x, layer.node_w, layer.node_b, layer.depth).leaf


def _gate_params(layer: nn.Module) -> list:
    if not isinstance(layer, FFF) or layer.master is None:
        return []
    return list(layer.gate.parameters()) if isinstance(layer.gate, nn.Module) else [layer.gate]


def _ridge(h: torch.Tensor, target: torch.Tensor, ridge: float, token_weight: torch.Tensor | None) -> torch.Tensor:
    """Ridge least squares of target (t, out) on [h, 1] (t, H+1), weighted by ``token_weight`` (t,)
    if given (per-output weights do not change it); the bias is not penalised. -> (H+1, out)."""
    h1 = torch.cat([h.double(), h.new_ones(h.shape[0], 1, dtype=torch.float64)], 1)
    hw = h1 if token_weight is None else h1 * token_weight.double()[:, None]
    gram = hw.T @ h1
    reg = ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    reg[-1, -1] = 0
    return torch.linalg.solve(gram + reg, hw.T @ target.double())


@torch.no_grad()
def _refit_outputs(layer: FFF | DenseFF, x: torch.Tensor, target: torch.Tensor, ridge: float,
                   token_weight: torch.Tensor | None) -> None:
    """Closed-form ridge refit of the output weights and bias (``_ridge``), hidden layer fixed:
    a DenseFF's fc2 on all tokens, each FFF leaf's (w2, b2) on the tokens routed to it (routing fixed;
    with a master leaf, on the tree's share of the target)."""
    act = ACTIVATIONS[layer.activation]
    if isinstance(layer, DenseFF):
        sol = _ridge(act(layer.fc1(x)), target, ridge, token_weight)
        layer.fc2.weight.copy_(sol[:-1].T)
        layer.fc2.bias.copy_(sol[-1])
        return
    if layer.master is None:
        resid = target
    else:                                                             # the tree's share of the target
        g = layer.master_gate(x)
        resid = (target - (1 - g) * layer.master(x)) / g
    leaf = route_leaves(layer, x)
    for j in range(layer.n_leaves):
        rows = leaf == j
        if rows.sum() < 2:
            continue
        sol = _ridge(act(x[rows] @ layer.w1[j] + layer.b1[j]), resid[rows], ridge,
                     None if token_weight is None else token_weight[rows])
        layer.w2[j].copy_(sol[:-1])
        layer.b2[j].copy_(sol[-1])


def routing_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters that decide where a row goes (an FFF's node hyperplanes); none for others."""
    return [layer.node_w, layer.node_b] if isinstance(layer, FFF) else []


def distill(layer: FFF | DenseFF, dense_ffn, inputs: torch.Tensor, steps: int = 0, lr: float = 1e-4,
            batch_size: int = 1024, ridge: float = 1e-3, refit: bool = True, progress: bool = True,
            desc: str = "distill", targets: torch.Tensor | None = None, dim_weight: torch.Tensor | None = None,
            token_weight: torch.Tensor | None = None) -> dict:
    """Train a carved FFF (or a pruned ``DenseFF``, see ``fastff.models.prune``) to reproduce
    ``targets`` (T, out) on ``inputs`` (T, in), in place; ``targets`` default to the dense FFN's
    outputs on ``inputs``.

    The error is weighted: ``sum_tk token_weight_t * dim_weight_k * (layer(x_t)_k - target_tk)^2``
    (weights default to 1), e.g. the LayerNorm that follows a BERT block scales output dim k of
    token t by ``gamma_k / sigma_t``, so ``gamma^2`` and ``1 / sigma^2`` measure what an error costs
    downstream (``fastff.models.sequential.convert_blocks`` passes them).
    Routing is frozen (node hyperplanes untouched; training runs the layer's eval forward, hard
    routing with gradients for the leaves: exactly the inference function).
    1. ``refit``: (token-weighted) ridge least squares for every leaf's (a DenseFF: fc2's) output
       weights and bias.
    2. ``steps`` Adam steps on leaf (and master; a DenseFF: all) weights on the weighted squared error, tqdm
       progress; kept only if they lower the calibration error below the refit's.
    Returns {"rel_before", "rel_refit", "rel_after"}: weighted squared error / weighted variance
    of the targets.
    """
    if not isinstance(layer, (FFF, DenseFF)):
        raise TypeError(f"layer must be a fastff.FFF or fastff.DenseFF, got {type(layer).__name__}")
    dense = as_dense(dense_ffn)
    steps = check_int("steps", steps, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    inputs = inputs.to(next(layer.parameters()).dtype)
    with torch.no_grad():
        target = dense(inputs) if targets is None else targets.to(inputs.dtype)
    dim_w = inputs.new_ones(target.shape[1]) if dim_weight is None else dim_weight.detach().to(inputs.dtype)
    tok_w = inputs.new_ones(target.shape[0]) if token_weight is None else token_weight.detach().to(inputs.dtype)
    dim_w, tok_w = dim_w / dim_w.mean(), tok_w / tok_w.mean()

    def weighted_sq(err: torch.Tensor, rows) -> torch.Tensor:
        return (err.square() @ dim_w * tok_w[rows]).sum()

    spread = float(weighted_sq(target - target.mean(0), slice(None)))

    def rel_error() -> float:
        was = layer.training
        layer.eval()
        with torch.no_grad():
            err = sum(float(weighted_sq(layer(inputs[r]) - target[r], r))
                      for r in torch.arange(inputs.shape[0]).split(8192))
        layer.train(was)
        return err / max(spread, 1e-30)

    stats = {"rel_before": rel_error()}
    if refit:
        _refit_outputs(layer, inputs, target, ridge, token_weight)
    stats["rel_refit"] = rel_error()
    if steps:
        frozen = [*routing_parameters(layer), *_gate_params(layer)]
        was_req = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        params = [p for p in layer.parameters() if p.requires_grad]
        refitted = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(0)
        was = layer.training
        layer.eval()
        try:
            for _ in progress_bar(range(steps), desc=desc, disable=not progress, leave=False):
                idx = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=gen)
                loss = weighted_sq(layer(inputs[idx]) - target[idx], idx) / idx.numel()
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            layer.train(was)
            for p, r in zip(frozen, was_req):
                p.requires_grad_(r)
        stats["rel_after"] = rel_error()
        if stats["rel_after"] > stats["rel_refit"]:  # Adam made it worse on the calibration set: undo
            with torch.no_grad():
                for p, q in zip(params, refitted):
                    p.copy_(q)
            stats["rel_after"] = stats["rel_refit"]
    else:
        stats["rel_after"] = stats["rel_refit"]
    return stats
