"""numba inference kernel of the product-key feedforward (glue in ``fastff.kernels.product_key``).

Per row, O(k) experts: the H·D query dot products, the query norm, per head the 2·n sub-key
scores, the two top-k's, the k×k candidate sums, their top-k, the softmax, then the H·k expert
neurons (dot product with x, activation, output rows gathered four per pass). Rows run in
parallel in chunks of ``CHUNK`` (``pk_parallel``) or on the calling thread (``pk_serial``); each
chunk allocates its scratch once.

Selection rule as ``fastff.kernels.product_key_reference``: largest first, ties to the smaller
index (sub-key index, then expert index ``a·n + b``). Shapes: x (B, I), w_query (H·D, I),
sub_keys (H, 2, n, D/2), w_in (n², I), w_out (n², O), b_out (O,); shift, scale (H·D,) the
batch norm's running mean and 1/sqrt(running var + eps) (empty otherwise); out (B, O);
experts (B, H·k).

The training kernels split the layer where autograd must see it: torch computes the queries and
the sub-key scores s (B, H, 2, n); ``pk_route`` picks the experts from s (same rule) and
weighs them (the softmax of their scores), ``pk_route_grad`` is its backward; the expert part
runs on the gathered-row kernels (``gathered.py``: dot products with the selected w_in rows,
the weighted sum of the selected w_out rows, weight gradients grouped by expert).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .common import JIT, act, dot_plus, gather_gemv, like

# query_norm -> the kernel's norm code
NORM_CODES = {"none": 0, "layer": 1, "batch": 2}
CHUNK = 16   # rows per parallel task


@njit(inline="always", **JIT)
def _top(s, k, taken, pos):
    """pos[:k] = positions of the k largest of s (n,), largest first; ties to the smaller position
    (a NaN is never larger, so every position is valid). taken (>= n,) bool scratch."""
    n = s.shape[0]
    taken[:n] = False
    for j in range(k):
        best = -1
        for a in range(n):
            if not taken[a] and (best < 0 or s[a] > s[best]):
                best = a
        taken[best] = True
        pos[j] = best


@njit(inline="always", **JIT)
def _sort_ascending(a, k):
    """Insertion sort of a[:k] (k small)."""
    for i in range(1, k):
        v = a[i]
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


@njit(inline="always", **JIT)
def _norm(q, shift, scale, norm, D, eps):
    """The query norm in place on q (H·D,): 1 per head over its D values, 2 per feature with the
    running statistics, 0 none."""
    if norm == 2:
        for j in range(q.shape[0]):
            q[j] = (q[j] - shift[j]) * scale[j]
    elif norm == 1:
        for lo in range(0, q.shape[0], D):
            mean = 0.0
            for j in range(lo, lo + D):
                mean += q[j]
            mean /= D
            var = 0.0
            for j in range(lo, lo + D):
                var += (q[j] - mean) ** 2
            inv = 1.0 / math.sqrt(var / D + eps)
            for j in range(lo, lo + D):
                q[j] = (q[j] - mean) * inv


@njit(inline="always", **JIT)
def _rows(x, w_query, sub_keys, w_in, w_out, b_out, shift, scale, norm, k, code, eps, start, stop, out, experts):
    """Rows [start, stop) (see the module docstring)."""
    H, _, n, half = sub_keys.shape
    D = 2 * half
    zero = like(w_in[0, 0], 0.0)
    q = np.empty(H * D, x.dtype)
    s1, s2 = np.empty(n, x.dtype), np.empty(n, x.dtype)
    ia, ib = np.empty(k, np.int64), np.empty(k, np.int64)
    cand, cexp = np.empty(k * k, x.dtype), np.empty(k * k, np.int64)
    taken = np.empty(max(n, k * k), np.bool_)
    pos = np.empty(k, np.int64)
    coef, idx = np.empty(H * k, x.dtype), np.empty(H * k, np.int64)
    for r in range(start, stop):
        xr = x[r]
        for j in range(H * D):
            q[j] = dot_plus(xr, w_query[j], zero)
        _norm(q, shift, scale, norm, D, eps)
        for h in range(H):
            q1, q2 = q[h * D:h * D + half], q[h * D + half:(h + 1) * D]
            for a in range(n):
                s1[a] = dot_plus(q1, sub_keys[h, 0, a], zero)
                s2[a] = dot_plus(q2, sub_keys[h, 1, a], zero)
            _top(s1, k, taken, ia)
            _top(s2, k, taken, ib)
            _sort_ascending(ia, k)        # ascending sub-keys: the k×k grid is in ascending expert order
            _sort_ascending(ib, k)
            for p in range(k):
                for t in range(k):
                    cand[p * k + t] = s1[ia[p]] + s2[ib[t]]
                    cexp[p * k + t] = ia[p] * n + ib[t]
            _top(cand, k, taken, pos)
            top = cand[pos[0]]
            total = 0.0
            for j in range(k):
                e = math.exp(cand[pos[j]] - top)
                coef[h * k + j] = e
                total += e
            for j in range(k):
                e = cexp[pos[j]]
                idx[h * k + j] = e
                experts[r, h * k + j] = e
                coef[h * k + j] = coef[h * k + j] / total * act(dot_plus(xr, w_in[e], zero), code)
        o = out[r]
        o[:] = b_out
        gather_gemv(o, coef, w_out, idx)


@njit(**JIT)
def pk_serial(x, w_query, sub_keys, w_in, w_out, b_out, shift, scale, norm, k, code, eps, out, experts):
    """Every row on the calling thread."""
    _rows(x, w_query, sub_keys, w_in, w_out, b_out, shift, scale, norm, k, code, eps, 0, x.shape[0], out, experts)


@njit(parallel=True, **JIT)
def pk_parallel(x, w_query, sub_keys, w_in, w_out, b_out, shift, scale, norm, k, code, eps, out, experts):
    """Chunks of ``CHUNK`` rows in parallel."""
    B = x.shape[0]
    for c in prange((B + CHUNK - 1) // CHUNK):
        _rows(x, w_query, sub_keys, w_in, w_out, b_out, shift, scale, norm, k, code, eps, c * CHUNK,
              min(B, (c + 1) * CHUNK), out, experts)


# ----------------------------------------------------------------------------- training


@njit(inline="always", **JIT)
def _push(val, ind, count, k, v, i):
    """Offer (v, i) to the best-first list val, ind [:count] of at most k entries (larger value
    first, equal values: smaller index first); returns the new count."""
    if count == k:
        if not (v > val[k - 1] or (v == val[k - 1] and i < ind[k - 1])):
            return count
        pos = k - 1
    else:
        pos = count
        count += 1
    while pos > 0 and (v > val[pos - 1] or (v == val[pos - 1] and i < ind[pos - 1])):
        val[pos] = val[pos - 1]
        ind[pos] = ind[pos - 1]
        pos -= 1
    val[pos] = v
    ind[pos] = i
    return count


@njit(inline="always", **JIT)
def _route_rows(s, k, start, stop, weights, experts):
    """Rows [start, stop) of ``pk_route``."""
    _, H, _, n = s.shape
    v1, i1 = np.empty(k, s.dtype), np.empty(k, np.int64)
    v2, i2 = np.empty(k, s.dtype), np.empty(k, np.int64)
    cv, ce = np.empty(k, s.dtype), np.empty(k, np.int64)
    for r in range(start, stop):
        for h in range(H):
            s1, s2 = s[r, h, 0], s[r, h, 1]
            c1 = c2 = 0
            for a in range(n):
                c1 = _push(v1, i1, c1, k, s1[a], a)
                c2 = _push(v2, i2, c2, k, s2[a], a)
            # candidates in descending order of each half: once a sum falls below the k-th best,
            # so does every later one of its row (and every later row, from its first column on)
            c = 0
            for p in range(k):
                t = 0
                while t < k:
                    v = v1[p] + v2[t]
                    if c == k and v < cv[k - 1]:
                        break
                    c = _push(cv, ce, c, k, v, i1[p] * n + i2[t])
                    t += 1
                if t == 0:
                    break
            top = cv[0]
            total = 0.0
            for j in range(k):
                e = math.exp(cv[j] - top)
                weights[r, h, j] = e
                total += e
            for j in range(k):
                weights[r, h, j] = weights[r, h, j] / total
                experts[r, h, j] = ce[j]


@njit(parallel=True, **JIT)
def pk_route(s, k, weights, experts):
    """The selection of every row and head from the sub-key scores s (B, H, 2, n) (any strides):
    experts (B, H, k) int64, largest score s[.., 0, a] + s[.., 1, b] first, ties to the smaller
    index (sub-key, then expert a·n + b), and weights (B, H, k), the softmax of their scores.
    Chunks of ``CHUNK`` rows in parallel."""
    B = s.shape[0]
    for c in prange((B + CHUNK - 1) // CHUNK):
        _route_rows(s, k, c * CHUNK, min(B, (c + 1) * CHUNK), weights, experts)


@njit(parallel=True, **JIT)
def pk_route_grad(g, weights, experts, n, gs):
    """The gradient of ``pk_route``'s weights with respect to s, from theirs g (B, H, k): gs
    (B, H, 2, n) = 0, then per row and head the scores' gradient c_j = w_j·(g_j - Σ_i w_i·g_i)
    (softmax) is added to gs[r, h, 0, a] and gs[r, h, 1, b] for expert e_j = a·n + b.
    Chunks of ``CHUNK`` rows in parallel."""
    B, H, k = experts.shape
    for c in prange((B + CHUNK - 1) // CHUNK):
        for r in range(c * CHUNK, min(B, (c + 1) * CHUNK)):
            gs[r] = 0
            for h in range(H):
                dot = like(g[r, h, 0], 0.0)
                for j in range(k):
                    dot += weights[r, h, j] * g[r, h, j]
                for j in range(k):
                    e = experts[r, h, j]
                    d = weights[r, h, j] * (g[r, h, j] - dot)
                    gs[r, h, 0, e // n] += d
                    gs[r, h, 1, e % n] += d
