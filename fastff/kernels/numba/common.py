"""Pieces every numba kernel shares: the activation table by code, the routing rule, vector
primitives (register-blocked: four rows or four weight vectors per pass, so each load feeds
four FMAs), the level-by-level grouped descent and the counting sort that groups rows.

Activation codes are ``fastff.functional.ACTIVATION_CODES``: 0 relu, 1 gelu, 2 gelu_tanh,
3 silu, 4 tanh, 5 sigmoid, 6 identity.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.core.extending import overload
from numba.np.numpy_support import as_dtype

from ...functional import ACTIVATION_CODES

if list(ACTIVATION_CODES) != ["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "identity"]:
    raise ImportError("fastff.kernels.numba: ACTIVATION_CODES changed; update act / act_grad")

# Reassociation and contraction only: lets LLVM vectorise reductions and fuse multiply-adds,
# while NaN / inf keep their IEEE meaning (the routing test `a >= 0` must stay exact).
FASTMATH = {"reassoc", "contract"}
JIT = dict(fastmath=FASTMATH, cache=True, nogil=True)


def like(ref, v):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(like)
def _like_overload(ref, v):
    """``v`` cast to the scalar type of ``ref`` (keeps float32 loops in float32)."""
    cast = as_dtype(ref).type
    return lambda ref, v: cast(v)


@njit(inline="always", **JIT)
def first_child(node):
    """Heap order: the left child of ``node``; the nodes ``d`` levels below ``node`` are
    ``first_child`` applied ``d`` times, plus 0 .. 2**d - 1."""
    return 2 * node + 1


@njit(inline="always", **JIT)
def child(node, a):
    """The routing rule: heap-order child of ``node``, right iff the pre-activation ``a >= 0``."""
    return first_child(node) + (a >= 0)


@njit(inline="always", **JIT)
def child_flipped(node, a, flip):
    """``child`` with the decision swapped where ``flip`` (region leak) is set."""
    return first_child(node) + ((a >= 0) ^ (flip != 0))


@njit(inline="always", **JIT)
def act(a, code):
    """Elementwise activation of a scalar, computed in float64, returned in ``a``'s type."""
    z = float(a)
    if code == 0:
        r = max(z, 0.0)
    elif code == 1:
        r = 0.5 * z * (1.0 + math.erf(z * 0.7071067811865476))
    elif code == 2:
        r = 0.5 * z * (1.0 + math.tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif code == 3:
        r = z / (1.0 + math.exp(-z))
    elif code == 4:
        r = math.tanh(z)
    elif code == 5:
        r = 1.0 / (1.0 + math.exp(-z))
    else:
        r = z
    return like(a, r)


_SQRT_HALF, _INV_SQRT_2PI, _TANH_K = 1 / math.sqrt(2), 1 / math.sqrt(2 * math.pi), math.sqrt(2 / math.pi)


@njit(inline="always", **JIT)
def act_grad(a, code):
    """(activation, its derivative) at ``a``, in ``a``'s type (the training kernels' ``act``)."""
    if code == 0:                                       # like torch: NaN passes (derivative 1), -inf gives 0
        return (a, 1.0) if a > 0 or a != a else (like(a, 0.0), 0.0)
    if code == 1:
        cdf = 0.5 * (1.0 + math.erf(a * _SQRT_HALF))
        return a * cdf, cdf + a * _INV_SQRT_2PI * math.exp(-0.5 * a * a)
    if code == 2:
        t = math.tanh(_TANH_K * (a + 0.044715 * a * a * a))
        return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _TANH_K * (1.0 + 3 * 0.044715 * a * a)
    if code == 3:
        s = 1.0 / (1.0 + math.exp(-a))
        return a * s, s * (1.0 + a * (1.0 - s))
    if code == 4:
        t = math.tanh(a)
        return t, 1.0 - t * t
    if code == 5:
        s = 1.0 / (1.0 + math.exp(-a))
        return s, s * (1.0 - s)
    return a, 1.0                                                      # identity


@njit(inline="always", **JIT)
def taken_prob(a):
    """Probability of the branch the routing rule takes: sigmoid(|a|) (``functional.taken_prob``)."""
    return like(a, 1.0 / (1.0 + math.exp(-abs(float(a)))))


@njit(inline="always", **JIT)
def dot_plus(x, w, b):
    """b + x·w over the last axis (vectorised reduction)."""
    s = b
    for i in range(x.shape[0]):
        s += x[i] * w[i]
    return s


@njit(inline="always", **JIT)
def axpy(o, a, w):
    """o += a · w."""
    for j in range(o.shape[0]):
        o[j] += a * w[j]


@njit(inline="always", **JIT)
def axpy4(o, a0, w0, a1, w1, a2, w2, a3, w3):
    """o += a0·w0 + a1·w1 + a2·w2 + a3·w3 in one pass over o (one load and store of o per four FMAs)."""
    for j in range(o.shape[0]):
        o[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]


@njit(inline="always", **JIT)
def dot4(v0, v1, v2, v3, w, b):
    """(b + v0·w, b + v1·w, b + v2·w, b + v3·w): each load of w feeds four rows' FMAs."""
    a0 = a1 = a2 = a3 = b
    for i in range(w.shape[0]):
        wi = w[i]
        a0 += v0[i] * wi
        a1 += v1[i] * wi
        a2 += v2[i] * wi
        a3 += v3[i] * wi
    return a0, a1, a2, a3


@njit(inline="always", **JIT)
def gemv_acc(o, a, w):
    """o (n,) += a (K,) @ w (K, n), four rows of w per pass over o."""
    K = a.shape[0]
    k = 0
    while k + 4 <= K:
        axpy4(o, a[k], w[k], a[k + 1], w[k + 1], a[k + 2], w[k + 2], a[k + 3], w[k + 3])
        k += 4
    for u in range(k, K):
        axpy(o, a[u], w[u])


@njit(inline="always", **JIT)
def gather_gemv(o, a, w, idx):
    """o (n,) += Σ_t a[t] · w[idx[t]]: the weight rows of one row's path (idx (T,) into w (M, n)),
    four per pass over o."""
    T = a.shape[0]
    t = 0
    while t + 4 <= T:
        axpy4(o, a[t], w[idx[t]], a[t + 1], w[idx[t + 1]], a[t + 2], w[idx[t + 2]], a[t + 3], w[idx[t + 3]])
        t += 4
    for u in range(t, T):
        axpy(o, a[u], w[idx[u]])


@njit(inline="always", **JIT)
def segment_dots(v, rows, s, e, w, b, res):
    """res[m] = b + v[rows[m]] · w for m in [s, e): rows that share one weight vector w, four
    rows per load of w."""
    m = s
    while m + 4 <= e:
        res[m], res[m + 1], res[m + 2], res[m + 3] = dot4(v[rows[m]], v[rows[m + 1]], v[rows[m + 2]],
                                                          v[rows[m + 3]], w, b)
        m += 4
    for q in range(m, e):
        res[q] = dot_plus(v[rows[q]], w, b)


@njit(inline="always", **JIT)
def descend(x, w, b, flip, root, t0, t1, order, s, e, acts, tmp, bounds, pre, nodes):
    """Level-by-level descent of the rows order[s:e], all at node ``root`` on level t0, through
    levels [t0, t1) of one tree (w (M, I), b (M,)): the rows at one node share each weight load
    (``segment_dots``). Records pre (B, T)[r, t] and nodes (B, T)[r, t]; flip (B, T) uint8 swaps a
    row's decision on a level (region leak; shape (0, T): none). On return order[s:e] is sorted
    stably by the node reached on level t1 (each node's rows contiguous, in heap order).
    Scratch: acts, tmp (B,) used on [s, e); bounds (>= 2**(t1-t0) + 1,)."""
    bounds[0], bounds[1] = s, e
    first = root
    for t in range(t0, t1):
        for j in range((1 << (t - t0)) - 1, -1, -1):      # descending: bounds is rewritten in place
            lo, hi = bounds[j], bounds[j + 1]
            node = first + j
            segment_dots(x, order, lo, hi, w[node], b[node], acts)
            left = first_child(node)
            n_left = 0
            for m in range(lo, hi):
                r = order[m]
                pre[r, t] = acts[m]
                nodes[r, t] = node
                tmp[m] = r
                go = child_flipped(node, acts[m], flip[r, t]) if flip.shape[0] else child(node, acts[m])
                acts[m] = go == left                       # reused as "goes left"
                n_left += go == left
            i, k = lo, lo + n_left
            for m in range(lo, hi):
                if acts[m] != 0:
                    order[i] = tmp[m]
                    i += 1
                else:
                    order[k] = tmp[m]
                    k += 1
            bounds[2 * j + 2], bounds[2 * j + 1], bounds[2 * j] = hi, lo + n_left, lo
        first = first_child(first)


@njit(cache=True)
def group_rows(keys, n_keys):
    """Counting sort. keys (P,) int64 in [0, n_keys) -> (order (P,): positions grouped by key,
    stable; starts (n_keys + 1,): group j is order[starts[j]:starts[j+1]])."""
    starts = np.zeros(n_keys + 1, np.int64)
    for p in range(keys.shape[0]):
        starts[keys[p] + 1] += 1
    for j in range(n_keys):
        starts[j + 1] += starts[j]
    fill = starts[:-1].copy()
    order = np.empty(keys.shape[0], np.int64)
    for p in range(keys.shape[0]):
        order[fill[keys[p]]] = p
        fill[keys[p]] += 1
    return order, starts


@njit(cache=True)
def group_tiles(key, n_keys, tile):
    """Rows grouped by ``key`` (B,), cut into tiles of <= ``tile`` rows of one key.

    Returns (order (B,) rows grouped by key, tiles (T, 3) of [key, start, stop] into order).
    """
    order, starts = group_rows(key, n_keys)
    n_tiles = 0
    for g in range(n_keys):
        n_tiles += (starts[g + 1] - starts[g] + tile - 1) // tile
    tiles = np.empty((n_tiles, 3), np.int64)
    t = 0
    for g in range(n_keys):
        for s in range(starts[g], starts[g + 1], tile):
            tiles[t, 0], tiles[t, 1], tiles[t, 2] = g, s, min(s + tile, starts[g + 1])
            t += 1
    return order, tiles


@njit(parallel=True, **JIT)
def descend_stage(x, w, b, flip, k, t0, t1, order, tiles, pre, nodes, acts, tmp):
    """Tree k, in parallel over tiles (T, 3) of [key, s, e]: the rows order[s:e], all at the
    ``key``-th node of level t0, descend levels [t0, t1) (``descend``)."""
    for i in prange(tiles.shape[0]):
        key, s, e = tiles[i, 0], tiles[i, 1], tiles[i, 2]
        bounds = np.empty((1 << (t1 - t0)) + 1, np.int64)
        descend(x, w[k], b[k], flip[:, k], key + (1 << t0) - 1, t0, t1, order, s, e, acts, tmp, bounds,
                pre[:, k], nodes[:, k])


@njit(**JIT)
def route(x, w, b, flip, split, tile, pre, nodes):
    """Sign-routed descent of K trees (w (K, M, I), b (K, M)) through T = pre.shape[2] levels by
    groups of rows that share weights: per tree, tiles of ``tile`` rows descend the top ``split``
    levels, rows are counting-sorted by the node reached on level ``split``, then each group (in
    tiles) descends the subtree under that node, whose weights stay in cache (split 0: all levels
    in one stage). flip (B, K, T) uint8, or (0, K, T) for none. Records pre, nodes (B, K, T) and returns
    (order, tiles) of the last stage: rows grouped by the last tree's path."""
    B, T = x.shape[0], pre.shape[2]
    acts = np.empty(B, x.dtype)
    tmp = np.empty(B, np.int64)
    top = split if 0 < split < T else T
    order, tiles = group_tiles(np.zeros(B, np.int64), 1, tile)
    for k in range(w.shape[0]):
        if k:
            order, tiles = group_tiles(np.zeros(B, np.int64), 1, tile)
        descend_stage(x, w, b, flip, k, 0, top, order, tiles, pre, nodes, acts, tmp)
        if top == T:
            continue
        key = np.empty(B, np.int64)
        for r in range(B):
            f = flip[r, k, top - 1] if flip.shape[0] else 0
            key[r] = child_flipped(nodes[r, k, top - 1], pre[r, k, top - 1], f) - ((1 << top) - 1)
        order, tiles = group_tiles(key, 1 << top, tile)
        descend_stage(x, w, b, flip, k, top, T, order, tiles, pre, nodes, acts, tmp)
    return order, tiles


@njit(inline="always", **JIT)
def segment_axpy(o, c, v, rows, s, e):
    """o = Σ_{m in [s, e)} c[m] · v[rows[m]], four rows per pass over o."""
    o[:] = 0
    m = s
    while m + 4 <= e:
        axpy4(o, c[m], v[rows[m]], c[m + 1], v[rows[m + 1]], c[m + 2], v[rows[m + 2]], c[m + 3], v[rows[m + 3]])
        m += 4
    for q in range(m, e):
        axpy(o, c[q], v[rows[q]])


@njit(cache=True)
def sort_by_deepest(nodes):
    """Rows of each tree sorted by their deepest visited node. nodes (B, K, T), T >= 1 ->
    (order (K, B), starts (K, 2**(T-1) + 1)); then the rows visiting node n are contiguous
    (``node_rows``)."""
    B, K, T = nodes.shape
    first = (1 << (T - 1)) - 1
    order = np.empty((K, B), np.int64)
    starts = np.empty((K, (1 << (T - 1)) + 1), np.int64)
    for k in range(K):
        order[k], starts[k] = group_rows(nodes[:, k, T - 1] - first, 1 << (T - 1))
    return order, starts


@njit(inline="always", **JIT)
def node_rows(n, levels, starts):
    """(level of node n, s, e): after ``sort_by_deepest`` the rows that visit node n are
    order[s:e] (their deepest nodes lie under n). starts: that tree's (2**(levels-1) + 1,)."""
    t = 0
    while (2 << t) - 1 <= n:
        t += 1
    below = levels - 1 - t
    lo = (n - ((1 << t) - 1)) << below
    return t, starts[lo], starts[lo + (1 << below)]
