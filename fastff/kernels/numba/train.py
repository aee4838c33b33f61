"""numba kernels of conditional training (glue and autograd in ``fastff.kernels.cpu``): forward
and backward touch only the weight rows a row uses.

- Forward: the grouped descent ``common.route`` (NeuronTree, and FFF decision nodes as one
  tree with region-leak flips) and ``infer.nt_outputs``: the inference kernels, which record
  the visited nodes and pre-activations.
- Backward, after one sort of each tree's rows by their deepest node (``common.sort_by_deepest``,
  so every node's rows are contiguous): per row, ``path_dots`` (output gradient · the path's
  w_out rows) and ``path_combine`` (input gradient from the path's w_in rows), four weight rows
  per pass over the row; per node, ``top_partials`` / ``deep_outer`` (weight gradients).
- ``leaf_forward`` / ``leaf_backward``: FFF leaves on their grouped rows as segment GEMMs.

Each weight-gradient row is owned by one thread: no races, no (B, S, F) temporaries. Compiled
with ``common.FASTMATH`` like every kernel, so NaN / inf propagate as in torch.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import FASTMATH, act_grad, axpy, dot4, dot_plus, first_child, gather_gemv, node_rows, segment_axpy


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def path_dots(v, w, idx, order, out):
    """out[r, s] = v[r] · w[idx[r, s]] (v (B, F), w (R, F), idx, out (B, S)): a row's dot products
    with the weight rows of its path, four weight rows per pass over v[r]; rows taken in
    ``order`` (neighbours share weight rows)."""
    S = idx.shape[1]
    zero = np.zeros(1, v.dtype)[0]
    for m in prange(order.shape[0]):
        r = order[m]
        vr, ir = v[r], idx[r]
        s = 0
        while s + 4 <= S:
            out[r, s], out[r, s + 1], out[r, s + 2], out[r, s + 3] = dot4(w[ir[s]], w[ir[s + 1]], w[ir[s + 2]],
                                                                          w[ir[s + 3]], vr, zero)
            s += 4
        for q in range(s, S):
            out[r, q] = dot_plus(vr, w[ir[q]], zero)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def path_combine(c, w, idx, order, out):
    """out[r] = Σ_s c[r, s] · w[idx[r, s]] (input gradient through a row's visited weight rows;
    c, idx (B, S), w (R, F)), rows taken in ``order`` (neighbours share weight rows)."""
    for m in prange(order.shape[0]):
        r = order[m]
        out[r, :] = 0
        gather_gemv(out[r], c[r], w, idx[r])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def nt_act_grads(pre, gh, code, da, h):
    """da = gh · act'(pre), h = act(pre), elementwise (B, K, T)."""
    for r in prange(pre.shape[0]):
        for k in range(pre.shape[1]):
            for t in range(pre.shape[2]):
                v, dv = act_grad(pre[r, k, t], code)
                h[r, k, t] = v
                da[r, k, t] = gh[r, k, t] * dv


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def top_partials(c, v, nodes, order, split, chunk, partial, partial_b):
    """Weight gradients of the nodes above level ``split`` (the ones with many rows), as partial
    sums: chunk i of ``chunk`` sorted rows adds c[r, k, t] · v[r] into partial[i, k, nodes[r, k, t]]
    (and c into partial_b) for t < split, reading each row once for all these levels.
    c, nodes (B, K, T), v (B, F), partial (C, K, 2**split - 1, F), partial_b (C, K, 2**split - 1)."""
    for i in prange(partial.shape[0]):
        partial[i] = 0
        partial_b[i] = 0
        for k in range(c.shape[1]):
            for m in range(i * chunk, min((i + 1) * chunk, order.shape[1])):
                r = order[k, m]
                for t in range(split):
                    n = nodes[r, k, t]
                    axpy(partial[i, k, n], c[r, k, t], v[r])
                    partial_b[i, k, n] += c[r, k, t]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def deep_outer(c, v, order, starts, split, gw, gb):
    """gw[k, n] = Σ_{r visits n} c[r, k, t_n] · v[r] and gb[k, n] = Σ c for the nodes on levels
    >= ``split``, in parallel over the subtrees under level ``split``: a subtree's rows are
    contiguous in ``order`` and stay in cache while its nodes are done in turn. A node no row
    visits gets zeros. c (B, K, T), v (B, F), gw (K, M, F), gb (K, M)."""
    K, T = c.shape[1], c.shape[2]
    groups = 1 << split
    for kg in prange(K * groups):
        k = kg // groups
        rows = order[k]
        cs = np.empty(rows.shape[0], c.dtype)
        first = kg % groups + groups - 1
        for t in range(split, T):
            for n in range(first, first + (1 << (t - split))):
                _, s, e = node_rows(n, T, starts[k])
                total = np.zeros(1, c.dtype)[0]
                for m in range(s, e):
                    cs[m] = c[rows[m], k, t]
                    total += cs[m]
                gb[k, n] = total
                segment_axpy(gw[k, n], cs, v, rows, s, e)
            first = first_child(first)


@njit(fastmath=FASTMATH, cache=True)
def gather_rows(x, rows):
    """x[rows] as a contiguous (len(rows), F) copy."""
    out = np.empty((rows.shape[0], x.shape[1]), dtype=x.dtype)
    for p in range(rows.shape[0]):
        out[p] = x[rows[p]]
    return out


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def leaf_forward(x, w1, b1, w2, b2, gate, mask, code, order, starts, a, leaf_out, y):
    """Rows grouped by leaf (order/starts). Per leaf l, on its rows X_l (a segment GEMM via
    BLAS): A = X_l @ w1[l] + b1[l], leaf_out = (act(A)·mask) @ w2[l] + b2[l], y = gate·leaf_out;
    mask (B, H) or (1, H) broadcast over rows. Parallel over leaves."""
    for l in prange(w1.shape[0]):
        rows = order[starts[l]:starts[l + 1]]
        if rows.shape[0] == 0:
            continue
        al = np.dot(gather_rows(x, rows), w1[l])
        hl = np.empty_like(al)
        for p in range(rows.shape[0]):
            for j in range(al.shape[1]):
                al[p, j] += b1[l, j]
                v, _ = act_grad(al[p, j], code)
                hl[p, j] = v * mask[rows[p] if mask.shape[0] > 1 else 0, j]
        ol = np.dot(hl, w2[l])
        for p in range(rows.shape[0]):
            r = rows[p]
            a[r] = al[p]
            for o in range(ol.shape[1]):
                leaf_out[r, o] = ol[p, o] + b2[l, o]
                y[r, o] = gate[r] * leaf_out[r, o]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def leaf_backward(x, g, w1, w2, gate, mask, code, order, starts, a, leaf_out,
                  gx, dw1, db1, dw2, db2, ggate):
    """Backward of ``leaf_forward``, segment GEMMs per leaf; each leaf's gradients are
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
        gl = gather_rows(g, rows)                                      # (n, O)
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
                v, dv = act_grad(a[r, j], code)
                m = mask[r if mask.shape[0] > 1 else 0, j]
                hl[p, j] = v * m
                dact[p, j] = dv * m
        db2[l] = gl.sum(axis=0)
        dw2[l] = np.dot(hl.T, gl)
        da = np.dot(gl, w2[l].T) * dact                                # (n, H)
        db1[l] = da.sum(axis=0)
        dw1[l] = np.dot(gather_rows(x, rows).T, da)
        gxl = np.dot(da, w1[l].T)
        for p in range(n):
            gx[rows[p]] = gxl[p]
