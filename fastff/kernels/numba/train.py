"""numba kernels of conditional training (glue and autograd in ``fastff.kernels.cpu``): forward
and backward touch only the weight rows a row uses.

- ``walk``: sign-routed descent of K trees (FFF decision nodes: K = 1), with region-leak flips;
  ``gather_combine`` / ``scatter_outer``: its backward (input and weight gradients).
- ``nt_forward`` / ``nt_backward_rows``: the fused NeuronTree walk + activation + output, and the
  per-row part of its backward; weight gradients via ``scatter_outer``.
- ``leaf_forward`` / ``leaf_backward``: FFF leaves on their grouped rows as segment GEMMs.

Weight gradients are accumulated per table row after a counting sort of the (row, table-row)
pairs, so each thread owns whole gradient rows (no races, no (B, S, F) temporaries).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import act_grad, child, child_flipped


@njit(parallel=True, fastmath=True, cache=True)
def scatter_outer(h, v, rows, starts, out):
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
def walk(x, w, b, flip, nodes, pre):
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
                n = child_flipped(n, acc, flip[r, k, t])


@njit(parallel=True, fastmath=True, cache=True)
def gather_combine(h, w, idx, out):
    """out[r] = Σ_s h[r, s] · w[idx[r, s]]. h (B,S), w (R,F), idx (B,S) -> out (B,F)."""
    for r in prange(h.shape[0]):
        out[r, :] = 0.0
        for s in range(idx.shape[1]):
            j = idx[r, s]
            c = h[r, s]
            for f in range(w.shape[1]):
                out[r, f] += c * w[j, f]


@njit(parallel=True, fastmath=True, cache=True)
def nt_forward(x, w_in, b_in, w_out, b_out, code, order, t0, t1, nodes, pre, y):
    """Fused NeuronTree forward over levels [t0, t1): walk, activation and output, rows taken
    in ``order``. x (B,I), w_in (K,M,I), b_in (K,M), w_out (K,M,O), b_out (O,) -> nodes,
    pre (B,K,T), y (B,O); y is initialised to b_out when t0 == 0, else continued from the node
    reached after level t0-1."""
    for i in prange(order.shape[0]):
        r = order[i]
        if t0 == 0:
            y[r, :] = b_out
        for k in range(w_in.shape[0]):
            n = 0 if t0 == 0 else child(nodes[r, k, t0 - 1], pre[r, k, t0 - 1])
            for t in range(t0, t1):
                acc = b_in[k, n]
                for f in range(x.shape[1]):
                    acc += x[r, f] * w_in[k, n, f]
                nodes[r, k, t] = n
                pre[r, k, t] = acc
                h, _ = act_grad(acc, code)
                for o in range(y.shape[1]):
                    y[r, o] += h * w_out[k, n, o]
                n = child(n, acc)


@njit(parallel=True, fastmath=True, cache=True)
def nt_backward_rows(x, g, w_in, w_out, code, nodes, pre, gx, da, h, zero):
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
                hv, dv = act_grad(pre[r, k, t], code)
                d = gh * dv
                h[r, k, t] = hv
                da[r, k, t] = d
                for f in range(x.shape[1]):
                    gx[r, f] += d * w_in[k, n, f]


@njit(fastmath=True, cache=True)
def gather_rows(x, rows):
    """x[rows] as a contiguous (len(rows), F) copy."""
    out = np.empty((rows.shape[0], x.shape[1]), dtype=x.dtype)
    for p in range(rows.shape[0]):
        out[p] = x[rows[p]]
    return out


@njit(parallel=True, fastmath=True, cache=True)
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


@njit(parallel=True, fastmath=True, cache=True)
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
