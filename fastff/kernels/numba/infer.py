"""numba hard-inference kernels (the ``"cpu"`` backend's compute; glue in ``fastff.kernels.cpu``).

- latency path (small batches): one tree walk per row, rows in parallel (``*_parallel``) or on
  the calling thread (``*_serial``); dot products and output updates SIMD over features; a row's
  input and output stay in L1, nothing is gathered or copied.
- NeuronTree throughput path (``nt_throughput``): walk the top ``split`` levels of every row,
  counting-sort rows by the node reached there, finish the walks group by group, so each group's
  subtree weights stay in L2. Bit-identical to the walk.
- FFF throughput path: route every row (``fff_route``), group rows by leaf, evaluate tiles of
  rows of one leaf as small GEMMs with the leaf's weights hot in cache: hand-written loops
  (``fff_tiles``, four rows per weight load) or two BLAS GEMMs per tile (``fff_tiles_gemm``).

FFF kernels take ``gated``: multiply each row's leaf output by the product of the taken
branches' probabilities (what an FFF trained with ``train_mode="hard_path"`` computes).
Shapes: x (B, I); FFF node_w (N, I), node_b (N,), w1 (L, I, H), b1 (L, H), w2 (L, H, O),
b2 (L, O); NeuronTree w_in (K, M, I), b_in (K, M), w_out (K, M, O), b_out (O,) or (0,); the
NeuronTree walk also takes the routing options (``route_bias`` (K, M) or (0, 0), ``gated``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import JIT, act, axpy, child, dot4, dot_plus, gather_gemv, gemv_acc, like, taken_prob


# ----------------------------------------------------------------------------- NeuronTree

@njit(inline="always", **JIT)
def _nt_row(x, w_in, b_in, w_out, b_out, route_bias, gated, levels, code, o):
    """One row through all K trees: o (O,) = b_out + sum of g·act(a)·w_out over visited nodes; the
    walk goes right iff a + route_bias[k, node] >= 0 (route_bias (K, M), or (0, 0) for none);
    g = 1, or with ``gated`` the product of the taken branches' probabilities above the node."""
    if b_out.shape[0]:
        o[:] = b_out
    else:
        o[:] = 0
    biased = route_bias.shape[1] > 0
    for k in range(w_in.shape[0]):
        node = 0
        g = like(o[0], 1.0)
        for _ in range(levels):
            a = dot_plus(x, w_in[k, node], b_in[k, node])
            axpy(o, act(a, code) * g if gated else act(a, code), w_out[k, node])
            r = a + route_bias[k, node] if biased else a
            if gated:
                g = g * taken_prob(r)
            node = child(node, r)


@njit(**JIT)
def nt_serial(x, w_in, b_in, w_out, b_out, route_bias, gated, levels, code, out):
    for r in range(x.shape[0]):
        _nt_row(x[r], w_in, b_in, w_out, b_out, route_bias, gated, levels, code, out[r])


@njit(parallel=True, **JIT)
def nt_parallel(x, w_in, b_in, w_out, b_out, route_bias, gated, levels, code, out):
    for r in prange(x.shape[0]):
        _nt_row(x[r], w_in, b_in, w_out, b_out, route_bias, gated, levels, code, out[r])


@njit(parallel=True, **JIT)
def nt_outputs(pre, nodes, w_out, b_out, code, order, tiles, out):
    """out[r] = b_out + Σ_{k,t} act(pre[r, k, t]) · w_out[k, nodes[r, k, t]] (K·T weight rows per
    row, four per pass over out[r]), in parallel over tiles [_, s, e] of ``order`` (rows grouped by
    path: neighbours share weight rows). pre, nodes (B, K, T), w_out (K, M, O)."""
    K, M, O = w_out.shape
    T = pre.shape[2]
    flat = w_out.reshape(K * M, O)
    for i in prange(tiles.shape[0]):
        h = np.empty(K * T, pre.dtype)
        idx = np.empty(K * T, np.int64)
        for m in range(tiles[i, 1], tiles[i, 2]):
            r = order[m]
            for k in range(K):
                for t in range(T):
                    h[k * T + t] = act(pre[r, k, t], code)
                    idx[k * T + t] = k * M + nodes[r, k, t]
            o = out[r]
            if b_out.shape[0]:
                o[:] = b_out
            else:
                o[:] = 0
            gather_gemv(o, h, flat, idx)


# ----------------------------------------------------------------------------- FFF

@njit(inline="always", **JIT)
def _fff_descend(x, node_w, node_b, depth, gated):
    """Hard descent of one row -> (leaf index, gate: product of the taken branches'
    probabilities if ``gated``, else 1)."""
    node = 0
    gate = like(x[0], 1.0)
    for _ in range(depth):
        a = dot_plus(x, node_w[node], node_b[node])
        if gated:
            gate *= taken_prob(a)
        node = child(node, a)
    return node - node_w.shape[0], gate


@njit(inline="always", **JIT)
def _fff_eval_leaf(x, w1, b1, w2, b2, code, h, o):
    """o (O,) = b2 + act(x·w1 + b1)·w2 for one leaf's weights; h (H,) is scratch."""
    h[:] = b1
    gemv_acc(h, x, w1)
    for k in range(h.shape[0]):
        h[k] = act(h[k], code)
    o[:] = b2
    gemv_acc(o, h, w2)


@njit(inline="always", **JIT)
def _fff_row(x, node_w, node_b, depth, w1, b1, w2, b2, code, gated, h, o):
    leaf, gate = _fff_descend(x, node_w, node_b, depth, gated)
    _fff_eval_leaf(x, w1[leaf], b1[leaf], w2[leaf], b2[leaf], code, h, o)
    if gated:
        for j in range(o.shape[0]):
            o[j] *= gate


@njit(**JIT)
def fff_serial(x, node_w, node_b, depth, w1, b1, w2, b2, code, gated, out):
    h = np.empty(w1.shape[2], x.dtype)
    for r in range(x.shape[0]):
        _fff_row(x[r], node_w, node_b, depth, w1, b1, w2, b2, code, gated, h, out[r])


@njit(parallel=True, **JIT)
def fff_parallel(x, node_w, node_b, depth, w1, b1, w2, b2, code, gated, out):
    for r in prange(x.shape[0]):
        h = np.empty(w1.shape[2], x.dtype)
        _fff_row(x[r], node_w, node_b, depth, w1, b1, w2, b2, code, gated, h, out[r])


@njit(**JIT)
def fff_reached(pre, nodes, n_nodes, gated, leaf, gate):
    """From a descent (``common.route``: pre, nodes (B, 1, depth)): leaf (B,) and gate (B,) of
    every row (see ``_fff_descend``)."""
    depth = pre.shape[2]
    for r in range(pre.shape[0]):
        g = like(gate[0], 1.0)
        if gated:
            for t in range(depth):
                g *= taken_prob(pre[r, 0, t])
        gate[r] = g
        leaf[r] = child(nodes[r, 0, depth - 1], pre[r, 0, depth - 1]) - n_nodes if depth else 0


@njit(inline="always", **JIT)
def _hidden4(x0, x1, x2, x3, w1t, b1, code, h):
    """h (4, H)[r, k] = act(x_r · w1t[k] + b1[k]) for four rows; each weight load feeds 4 FMAs."""
    for k in range(w1t.shape[0]):
        a0, a1, a2, a3 = dot4(x0, x1, x2, x3, w1t[k], b1[k])
        h[0, k], h[1, k], h[2, k], h[3, k] = act(a0, code), act(a1, code), act(a2, code), act(a3, code)


@njit(inline="always", **JIT)
def _out4(h, w2, b2, o0, o1, o2, o3):
    """o_r (O,) = b2 + h[r] @ w2 (H, O) for four rows, four rows of w2 per pass over the outputs."""
    o0[:] = b2
    o1[:] = b2
    o2[:] = b2
    o3[:] = b2
    K = h.shape[1]
    k = 0
    while k + 4 <= K:
        v0, v1, v2, v3 = w2[k], w2[k + 1], w2[k + 2], w2[k + 3]
        h00, h01, h02, h03 = h[0, k], h[0, k + 1], h[0, k + 2], h[0, k + 3]
        h10, h11, h12, h13 = h[1, k], h[1, k + 1], h[1, k + 2], h[1, k + 3]
        h20, h21, h22, h23 = h[2, k], h[2, k + 1], h[2, k + 2], h[2, k + 3]
        h30, h31, h32, h33 = h[3, k], h[3, k + 1], h[3, k + 2], h[3, k + 3]
        for j in range(o0.shape[0]):
            a, b, c, d = v0[j], v1[j], v2[j], v3[j]
            o0[j] += h00 * a + h01 * b + h02 * c + h03 * d
            o1[j] += h10 * a + h11 * b + h12 * c + h13 * d
            o2[j] += h20 * a + h21 * b + h22 * c + h23 * d
            o3[j] += h30 * a + h31 * b + h32 * c + h33 * d
        k += 4
    for u in range(k, K):
        axpy(o0, h[0, u], w2[u])
        axpy(o1, h[1, u], w2[u])
        axpy(o2, h[2, u], w2[u])
        axpy(o3, h[3, u], w2[u])


@njit(inline="always", **JIT)
def _scale_rows(out, order, s, e, gate):
    """out[order[m]] *= gate[order[m]] for m in [s, e)."""
    for m in range(s, e):
        r = order[m]
        g = gate[r]
        for j in range(out.shape[1]):
            out[r, j] *= g


@njit(parallel=True, **JIT)
def fff_tiles(x, w1, b1, w2, b2, code, gated, gate, order, tiles, out):
    """Evaluate each tile: its rows all reached leaf ``tiles[t, 0]``, so the tile is a
    (rows x I) @ (I x H) -> act -> (H x O) product whose leaf weights stay in L1/L2 across rows;
    rows go four at a time (each weight vector loaded once per four rows), the rest one by one."""
    H = w1.shape[2]
    for t in prange(tiles.shape[0]):
        leaf, s, e = tiles[t, 0], tiles[t, 1], tiles[t, 2]
        w1t = w1[leaf].T.copy()                       # (H, I): the hidden layer as H dot products
        h = np.empty((4, H), x.dtype)
        m = s
        while m + 4 <= e:
            r0, r1, r2, r3 = order[m], order[m + 1], order[m + 2], order[m + 3]
            _hidden4(x[r0], x[r1], x[r2], x[r3], w1t, b1[leaf], code, h)
            _out4(h, w2[leaf], b2[leaf], out[r0], out[r1], out[r2], out[r3])
            m += 4
        h1 = h[0]
        for q in range(m, e):
            xr = x[order[q]]
            for k in range(H):
                h1[k] = act(dot_plus(xr, w1t[k], b1[leaf, k]), code)
            o = out[order[q]]
            o[:] = b2[leaf]
            gemv_acc(o, h1, w2[leaf])
        if gated:
            _scale_rows(out, order, s, e, gate)


@njit(parallel=True, **JIT)
def fff_tiles_gemm(x, w1, b1, w2, b2, code, gated, gate, order, tiles, out):
    """Wide leaves: each tile (rows of one leaf) as two BLAS GEMMs on its gathered rows,
    out[rows] = act(X_t @ w1[leaf] + b1[leaf]) @ w2[leaf] + b2[leaf]. BLAS must be
    single-threaded here (``fastff.threads.single_threaded_blas``): the tiles already run in parallel."""
    for t in prange(tiles.shape[0]):
        leaf, s, e = tiles[t, 0], tiles[t, 1], tiles[t, 2]
        xt = np.empty((e - s, x.shape[1]), x.dtype)
        for m in range(s, e):
            xt[m - s] = x[order[m]]
        h = np.dot(xt, w1[leaf])
        for m in range(e - s):
            for k in range(h.shape[1]):
                h[m, k] = act(h[m, k] + b1[leaf, k], code)
        o = np.dot(h, w2[leaf])
        for m in range(s, e):
            out[order[m]] = o[m - s] + b2[leaf]
        if gated:
            _scale_rows(out, order, s, e, gate)
