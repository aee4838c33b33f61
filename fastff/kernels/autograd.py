"""Conditional training: autograd Functions whose forward AND backward touch only the weight
rows a row actually uses — O(depth) per row, not O(width).

- ``neuron_tree_conditional`` — NeuronTree training: the walk records the visited node per
  level and tree (K·(D+1) ints per row); the backward scatters the gradients into exactly those
  rows of w_in, b_in and w_out. Cost O(K·(D+1)·(in+out)) per row, both passes.
- ``fff_hard_path`` — FFF Switch-style top-1 training: one greedy descent (O(depth·in)), then
  only the reached leaf, rows grouped by leaf so each leaf's forward / backward is a small
  segment GEMM (O(leaf_width·(in+out)) per row).

On CPU both run as numba kernels: row-parallel gathers, and weight gradients accumulated per
table row (leaf / neuron) after a counting sort of the (row, table-row) pairs, so each thread
owns whole gradient rows (no race, no (B, S, F) temporaries). Weight gradients are ordinary
dense tensors whose untouched rows are zero (see ``docs/training.md`` for the optimizer
trade-off). On other devices the same maths runs as differentiable torch gathers.
"""
from __future__ import annotations


import numba
import numpy as np
import torch
from numba import njit, prange

from .._checks import check_choice
from ..functional import get_activation, neuron_tree_walk
from ._threads import follow_torch_threads, single_threaded_blas
from .cpu import ACT_CODES, _act_grad, _np, group_rows  # shared with the inference kernels

IMPLS = ("auto", "numba", "torch")
_SORT_LEVEL = 6     # NeuronTree forward: rows are re-sorted by their node after this many levels
_CHUNK = 8          # dynamic scheduling chunk for the grouped loops (the root / big leaves are heavy)


# --------------------------------------------------------------------------------------------
# numba helpers
# --------------------------------------------------------------------------------------------
@njit(parallel=True, fastmath=True, cache=True)
def _nb_scatter_outer(h, v, rows, starts, out):
    """out[j] = Σ_{p in starts[j]:starts[j+1]} h[p] · v[rows[p]] for every table row j (pairs
    grouped by j; each thread owns whole out rows, accumulated in L1)."""
    for j in prange(out.shape[0]):
        out[j, :] = 0.0
        for p in range(starts[j], starts[j + 1]):
            r = rows[p]
            c = h[p]
            for f in range(v.shape[1]):
                out[j, f] += c * v[r, f]


@njit(parallel=True, fastmath=True, cache=True)
def _nb_walk(x, w, b, flip, nodes, pre):
    """Sign-routed descent of K trees. x (B,F), w (K,M,F), b (K,M), flip (B,K,T) uint8 ->
    nodes, pre (B,K,T); a flipped level takes the other child."""
    for r in prange(x.shape[0]):
        for k in range(w.shape[0]):
            n = 0
            for t in range(flip.shape[2]):
                acc = b[k, n]
                for f in range(x.shape[1]):
                    acc += x[r, f] * w[k, n, f]
                nodes[r, k, t] = n
                pre[r, k, t] = acc
                n = 2 * n + 1 + ((1 if acc >= 0 else 0) ^ flip[r, k, t])


@njit(parallel=True, fastmath=True, cache=True)
def _nb_gather_combine(h, w, idx, out):
    """out[r] = Σ_s h[r, s] · w[idx[r, s]]. h (B,S), w (R,F), idx (B,S) -> out (B,F)."""
    for r in prange(h.shape[0]):
        out[r, :] = 0.0
        for s in range(idx.shape[1]):
            j = idx[r, s]
            c = h[r, s]
            for f in range(w.shape[1]):
                out[r, f] += c * w[j, f]


@njit(parallel=True, fastmath=True, cache=True)
def _nb_nt_forward(x, w_in, b_in, w_out, b_out, code, order, t0, t1, nodes, pre, y):
    """Fused NeuronTree forward over levels [t0, t1): walk, activation and output, rows taken
    in ``order``. x (B,I), w_in (K,M,I), b_in (K,M), w_out (K,M,O), b_out (O,) -> nodes,
    pre (B,K,T), y (B,O); y is initialised to b_out when t0 == 0, else continued from the node
    reached after level t0-1."""
    for i in prange(order.shape[0]):
        r = order[i]
        if t0 == 0:
            y[r, :] = b_out
        for k in range(w_in.shape[0]):
            n = 0 if t0 == 0 else 2 * nodes[r, k, t0 - 1] + 1 + (1 if pre[r, k, t0 - 1] >= 0 else 0)
            for t in range(t0, t1):
                acc = b_in[k, n]
                for f in range(x.shape[1]):
                    acc += x[r, f] * w_in[k, n, f]
                nodes[r, k, t] = n
                pre[r, k, t] = acc
                h, _ = _act_grad(acc, code)
                for o in range(y.shape[1]):
                    y[r, o] += h * w_out[k, n, o]
                n = 2 * n + 1 + (1 if acc >= 0 else 0)


@njit(parallel=True, fastmath=True, cache=True)
def _nb_nt_backward_rows(x, g, w_in, w_out, code, nodes, pre, gx, da, h, zero):
    """Per row: gh = g·w_out[node], da = gh·act'(pre), gx = Σ da·w_in[node]; also h = act(pre).
    ``zero``: a 0 of the arrays' dtype (accumulators stay in that precision)."""
    for r in prange(x.shape[0]):
        gx[r, :] = 0.0
        for k in range(w_in.shape[0]):
            for t in range(nodes.shape[2]):
                n = nodes[r, k, t]
                gh = zero
                for o in range(g.shape[1]):
                    gh += g[r, o] * w_out[k, n, o]
                hv, dv = _act_grad(pre[r, k, t], code)
                d = gh * dv
                h[r, k, t] = hv
                da[r, k, t] = d
                for f in range(x.shape[1]):
                    gx[r, f] += d * w_in[k, n, f]


@njit(fastmath=True, cache=True)
def _gather_rows(x, rows):
    """x[rows] as a contiguous (len(rows), F) copy."""
    out = np.empty((rows.shape[0], x.shape[1]), dtype=x.dtype)
    for p in range(rows.shape[0]):
        out[p] = x[rows[p]]
    return out


@njit(parallel=True, fastmath=True, cache=True)
def _nb_leaf_forward(x, w1, b1, w2, b2, gate, mask, code, order, starts, a, leaf_out, y):
    """Rows grouped by leaf (order/starts). Per leaf l, on its rows X_l (a segment GEMM via
    BLAS): A = X_l @ w1[l] + b1[l], leaf_out = (act(A)·mask) @ w2[l] + b2[l], y = gate·leaf_out;
    mask (B, H) or (1, H) broadcast over rows.
    Parallel over leaves."""
    for l in prange(w1.shape[0]):
        rows = order[starts[l]:starts[l + 1]]
        if rows.shape[0] == 0:
            continue
        al = np.dot(_gather_rows(x, rows), w1[l])
        hl = np.empty_like(al)
        for p in range(rows.shape[0]):
            for j in range(al.shape[1]):
                al[p, j] += b1[l, j]
                v, _ = _act_grad(al[p, j], code)
                hl[p, j] = v * mask[rows[p] if mask.shape[0] > 1 else 0, j]
        ol = np.dot(hl, w2[l])
        for p in range(rows.shape[0]):
            r = rows[p]
            a[r] = al[p]
            for o in range(ol.shape[1]):
                leaf_out[r, o] = ol[p, o] + b2[l, o]
                y[r, o] = gate[r] * leaf_out[r, o]


@njit(parallel=True, fastmath=True, cache=True)
def _nb_leaf_backward(x, g, w1, w2, gate, mask, code, order, starts, a, leaf_out,
                      gx, dw1, db1, dw2, db2, ggate):
    """Backward of ``_nb_leaf_forward``, segment GEMMs per leaf; each leaf's gradients are
    owned by one thread (leaves nobody reached get zeros)."""
    for l in prange(w1.shape[0]):
        rows = order[starts[l]:starts[l + 1]]
        n = rows.shape[0]
        if n == 0:
            dw1[l] = 0.0
            db1[l] = 0.0
            dw2[l] = 0.0
            db2[l] = 0.0
            continue
        gl = _gather_rows(g, rows)                                     # (n, O)
        hl = np.empty((n, w1.shape[2]), dtype=x.dtype)
        dact = np.empty_like(hl)
        for p in range(n):
            r = rows[p]
            acc = gl[p, 0] * 0
            for o in range(gl.shape[1]):
                acc += gl[p, o] * leaf_out[r, o]
                gl[p, o] *= gate[r]
            ggate[r] = acc
            for j in range(hl.shape[1]):
                v, dv = _act_grad(a[r, j], code)
                m = mask[r if mask.shape[0] > 1 else 0, j]
                hl[p, j] = v * m
                dact[p, j] = dv * m
        db2[l] = gl.sum(axis=0)
        dw2[l] = np.dot(hl.T, gl)
        da = np.dot(gl, w2[l].T) * dact                                # (n, H)
        db1[l] = da.sum(axis=0)
        dw1[l] = np.dot(_gather_rows(x, rows).T, da)
        gxl = np.dot(da, w1[l].T)
        for p in range(n):
            gx[rows[p]] = gxl[p]


# --------------------------------------------------------------------------------------------
# glue
# --------------------------------------------------------------------------------------------
def _use_numba(impl: str, activation: str, *tensors: torch.Tensor) -> bool:
    impl = check_choice("impl", impl, IMPLS)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if impl == "numba" and not on_cpu:
        raise ValueError("impl='numba' needs CPU tensors; use impl='torch' or 'auto' on other devices")
    supported = activation in ACT_CODES and all(t.dtype in (torch.float32, torch.float64) for t in tensors)
    if impl == "numba" and not supported:
        raise ValueError(f"impl='numba' supports float32/float64 and activations {sorted(ACT_CODES)}; "
                         f"got {tensors[0].dtype} and {activation!r}")
    return (impl == "numba" or (impl == "auto" and on_cpu)) and supported


def _rows(m: int, nodes: np.ndarray) -> np.ndarray:
    """(B, K, T) node numbers -> (B, K·T) row numbers into the flattened (K·M, F) table."""
    return (nodes + np.arange(nodes.shape[1])[None, :, None] * m).reshape(nodes.shape[0], -1)


def _scatter_outer(h: np.ndarray, v: np.ndarray, idx: np.ndarray, n_rows: int, grouping=None) -> np.ndarray:
    """Weight gradient ``G[idx[b, s]] += h[b, s] · v[b]``. h, idx (B,S), v (B,F) -> (n_rows, F).
    ``grouping``: ``group_rows(idx.ravel(), n_rows)`` if already computed."""
    order, starts = group_rows(idx.ravel(), n_rows) if grouping is None else grouping
    out = np.empty((n_rows, v.shape[1]), dtype=v.dtype)
    with numba.parallel_chunksize(_CHUNK):
        _nb_scatter_outer(h.ravel()[order], v, order // max(1, idx.shape[1]), starts, out)
    return out


class _Walk(torch.autograd.Function):
    """Hard descent of K trees (numba), differentiable in the visited pre-activations.
    x (B,F), w (K,M,F), b (K,M), flip (B,K,T) bool -> (pre (B,K,T), nodes (B,K,T) long)."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, x, w, b, flip):
        nodes = np.empty(flip.shape, dtype=np.int64)
        pre = np.empty(flip.shape, dtype=_np(x).dtype)
        _nb_walk(_np(x), _np(w), _np(b), _np(flip).view(np.uint8), nodes, pre)
        nodes = torch.from_numpy(nodes)
        ctx.save_for_backward(x, w, nodes)
        ctx.mark_non_differentiable(nodes)
        return torch.from_numpy(pre), nodes

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g, _):
        x, w, nodes = ctx.saved_tensors
        K, M, F = w.shape
        idx, g = _rows(M, nodes.numpy()), _np(g.flatten(1))            # (B, K·T)
        gx = np.empty_like(_np(x))
        _nb_gather_combine(g, _np(w).reshape(K * M, F), idx, gx)
        gw = _scatter_outer(g, _np(x), idx, K * M).reshape(K, M, F)
        gb = np.bincount(idx.ravel(), weights=g.ravel(), minlength=K * M).astype(g.dtype).reshape(K, M)
        return torch.from_numpy(gx), torch.from_numpy(gw), torch.from_numpy(gb), None


class _NeuronTree(torch.autograd.Function):
    """Fused NeuronTree (numba). -> (y (B,O), nodes (B,K,D+1))."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, x, w_in, b_in, w_out, b_out, code):
        K, M = w_in.shape[:2]
        T = (M + 1).bit_length() - 1
        nodes = np.empty((x.shape[0], K, T), dtype=np.int64)
        pre = np.empty((x.shape[0], K, T), dtype=_np(x).dtype)
        y = np.empty((x.shape[0], w_out.shape[-1]), dtype=pre.dtype)
        args = _np(x), _np(w_in), _np(b_in), _np(w_out), _np(b_out), code
        # the top levels in row order; then rows sorted by the node they reached, so the deep
        # levels' weight rows are shared by neighbouring rows (cache reuse)
        split = min(T, _SORT_LEVEL)
        _nb_nt_forward(*args, np.arange(x.shape[0]), 0, split, nodes, pre, y)
        if split < T:
            last = 2 * nodes[:, 0, split - 1] + 1 + (pre[:, 0, split - 1] >= 0)
            _nb_nt_forward(*args, group_rows(last, M)[0], split, T, nodes, pre, y)
        nodes = torch.from_numpy(nodes)
        ctx.save_for_backward(x, w_in, w_out, nodes, torch.from_numpy(pre))
        ctx.code = code
        ctx.mark_non_differentiable(nodes)
        return torch.from_numpy(y), nodes

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g, _):
        x, w_in, w_out, nodes, pre = ctx.saved_tensors
        K, M, F = w_in.shape
        # rows sorted by their (first tree's) path: neighbours share weight rows (cache reuse);
        # the big permutations run as (parallel) torch index ops
        order = torch.from_numpy(group_rows(nodes[:, 0, -1].numpy().copy(), M)[0])
        xs, gs = (_np(t.index_select(0, order)) for t in (x, g.contiguous()))
        nodes, pre = nodes.numpy()[order.numpy()], pre.numpy()[order.numpy()]
        gx_sorted, da, h = np.empty_like(xs), np.empty_like(pre), np.empty_like(pre)
        _nb_nt_backward_rows(xs, gs, _np(w_in), _np(w_out), ctx.code, nodes, pre, gx_sorted, da, h, xs.dtype.type(0))
        gx = torch.empty_like(x).index_copy_(0, order, torch.from_numpy(gx_sorted))
        idx = _rows(M, nodes)
        grouping = group_rows(idx.ravel(), K * M)
        gw_in = _scatter_outer(da, xs, idx, K * M, grouping).reshape(K, M, F)
        gw_out = _scatter_outer(h, gs, idx, K * M, grouping).reshape(K, M, -1)
        gb_in = np.bincount(idx.ravel(), weights=da.ravel(), minlength=K * M).astype(da.dtype).reshape(K, M)
        return (gx, torch.from_numpy(gw_in), torch.from_numpy(gb_in), torch.from_numpy(gw_out), g.sum(0), None)


def neuron_tree_conditional(x, w_in, b_in, w_out, b_out, activation: str, impl: str = "auto"):
    """NeuronTree training forward whose forward and backward cost O(K·(D+1)·(in+out)) per row.

    x (B, I), w_in (K, M, I), b_in (K, M), w_out (K, M, O), b_out (O,) or None -> (y (B, O),
    nodes (B, K, D+1) long, the visited node per row, tree and level). x, w_in, b_in, w_out and
    b_out all get gradients; weight gradients are nonzero only in visited rows. Equal (values
    and gradients) to ``reference.neuron_tree_masked_dense``. ``impl``: ``"numba"`` (CPU,
    fused kernels), ``"torch"`` (differentiable gathers, any device) or ``"auto"``.
    """
    if _use_numba(impl, activation, x, w_in):
        bias = w_out.new_zeros(w_out.shape[-1]) if b_out is None else b_out
        return _NeuronTree.apply(x, w_in, b_in, w_out, bias, ACT_CODES[activation])
    depth = (w_in.shape[1] + 1).bit_length() - 2
    nodes, a = neuron_tree_walk(x, w_in, b_in, depth)                  # (B, K, D+1)
    tree = torch.arange(w_in.shape[0], device=x.device)[:, None]
    y = torch.einsum("bkt,bkto->bo", get_activation(activation)(a), w_out[tree, nodes])
    return (y if b_out is None else y + b_out), nodes


class _Leaves(torch.autograd.Function):
    """Reached-leaf MLPs (numba), rows grouped by leaf. -> (B, O) = gate · leaf(x)."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, x, w1, b1, w2, b2, gate, leaf, mask, code):
        order, starts = group_rows(_np(leaf), w1.shape[0])
        B, H = x.shape[0], w1.shape[-1]
        a = np.empty((B, H), dtype=_np(x).dtype)
        leaf_out, y = np.empty((B, w2.shape[-1]), dtype=a.dtype), np.empty((B, w2.shape[-1]), dtype=a.dtype)
        with numba.parallel_chunksize(1), single_threaded_blas():
            _nb_leaf_forward(_np(x), _np(w1), _np(b1), _np(w2), _np(b2), _np(gate), _np(mask), code,
                             order, starts, a, leaf_out, y)
        ctx.save_for_backward(x, w1, w2, gate, mask, torch.from_numpy(a), torch.from_numpy(leaf_out))
        ctx.grouping, ctx.code = (order, starts), code
        return torch.from_numpy(y)

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g):
        x, w1, w2, gate, mask, a, leaf_out = (_np(t) for t in ctx.saved_tensors)
        gx, ggate = np.empty_like(x), np.empty_like(gate)
        dw1, dw2 = np.empty_like(w1), np.empty_like(w2)
        db1, db2 = np.empty(w1.shape[::2], dtype=x.dtype), np.empty(w2.shape[::2], dtype=x.dtype)
        with numba.parallel_chunksize(1), single_threaded_blas():
            _nb_leaf_backward(x, _np(g), w1, w2, gate, mask, ctx.code, *ctx.grouping, a, leaf_out,
                              gx, dw1, db1, dw2, db2, ggate)
        return tuple(map(torch.from_numpy, (gx, dw1, db1, dw2, db2, ggate))) + (None, None, None)


def fff_hard_path(x, node_w, node_b, w1, b1, w2, b2, activation: str, flip=None, hardened: bool = False,
                  dropout: float = 0.0, impl: str = "auto"):
    """FFF Switch-style top-1 training forward: one greedy descent, only the reached leaf evaluated.

    At each level the row takes the more probable child of its decision ``p = sigmoid(z)``
    (right iff the node logit ``z >= 0``; a level with ``flip`` set — region leak, p -> 1-p —
    takes the other child). The leaf output is multiplied by the gate: the soft mixture weight of
    the reached leaf, i.e. the product of the taken branches' probabilities, so the visited
    nodes get gradients (``hardened``: the gate is 1 and nodes get none). Cost per row
    O(depth·in + leaf_width·(in + out)), forward and backward. ``dropout`` acts on the leaf's
    hidden units.

    x (B, in), node_w (N, in), node_b (N,), w1 (L, in, H), b1 (L, H), w2 (L, H, out), b2 (L, out),
    flip (B, depth) bool or None -> (y (B, out), q (B, depth) the taken branches' probabilities
    (gate = q.prod(1); all ones if ``hardened``), leaf (B,) long, nodes (B, depth) long the
    visited nodes, logits (B, depth) their logits). q and logits are differentiable.
    """
    numba_ = _use_numba(impl, activation, x, node_w)
    B, L, H = x.shape[0], *b1.shape
    depth, N = L.bit_length() - 1, node_b.shape[0]
    if flip is None:
        flip = torch.zeros(B, depth, dtype=torch.bool, device=x.device)
    if numba_:
        logits, nodes = _Walk.apply(x, node_w[None], node_b[None], flip[:, None])
        logits, nodes = logits[:, 0], nodes[:, 0]                     # (B, d)
    else:
        nodes, logits = _torch_walk(x, node_w, node_b, flip)
    right = (logits >= 0) ^ flip
    leaf = 2 * nodes[:, -1] + 1 + right[:, -1].long() - N if depth else right.new_zeros(B).long()
    z = torch.where(flip, -logits, logits)                            # the leaked logits
    q = torch.ones_like(logits) if hardened else torch.sigmoid(torch.where(right, z, -z))
    gate = q.prod(1)
    mask = (torch.nn.functional.dropout(x.new_ones(B, H), dropout, training=True) if dropout > 0
            else x.new_ones(1, H))
    if numba_:
        y = _Leaves.apply(x, w1, b1, w2, b2, gate, leaf, mask, ACT_CODES[activation])
    else:
        h = get_activation(activation)(torch.einsum("bi,bih->bh", x, w1[leaf]) + b1[leaf]) * mask
        y = gate[:, None] * (torch.einsum("bh,bho->bo", h, w2[leaf]) + b2[leaf])
    return y, q, leaf, nodes, logits


def _torch_walk(x, node_w, node_b, flip):
    """Differentiable greedy descent with torch gathers -> (nodes (B, d), logits (B, d))."""
    node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    nodes, logits = [], []
    for t in range(flip.shape[1]):
        z = torch.einsum("bi,bi->b", x, node_w[node]) + node_b[node]
        nodes.append(node)
        logits.append(z)
        node = 2 * node + 1 + ((z >= 0) ^ flip[:, t]).long()
    if not nodes:
        return x.new_zeros(x.shape[0], 0, dtype=torch.long), x.new_zeros(x.shape[0], 0)
    return torch.stack(nodes, 1), torch.stack(logits, 1)
