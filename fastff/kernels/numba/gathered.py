"""numba kernels over gathered weight rows (glue and autograd in ``fastff.kernels.gathered``).

Each of B rows uses S rows of a weight table w (R, F), idx (B, S) int64 (repeats allowed):

- ``dots``: out[r, s] = v[r] · w[idx[r, s]], four weight rows per pass over v[r];
- ``combine``: out[r] = Σ_s c[r, s] · w[idx[r, s]], four weight rows per pass over out[r];
- ``grouped_sums``: the weight-row gradients gw[e] = Σ c[r, s] · v[r] over the pairs (r, s) with
  idx[r, s] = e, the pairs grouped by row (``common.group_rows``), each row written by one thread.

Rows run in parallel in chunks of ``CHUNK``. ``row_dots`` / ``pair_sum`` are the inlined
per-row pieces, shared with the product-key kernels.
"""
from __future__ import annotations

from numba import njit, prange

from .common import JIT, axpy, axpy4, dot4, dot_plus, gather_gemv, like

CHUNK = 16   # rows per parallel task


@njit(inline="always", **JIT)
def row_dots(v, w, idx, zero, res):
    """res[j] = v · w[idx[j]] for the S = idx.shape[0] rows of w, four per pass over v."""
    S = idx.shape[0]
    j = 0
    while j + 4 <= S:
        res[j], res[j + 1], res[j + 2], res[j + 3] = dot4(w[idx[j]], w[idx[j + 1]], w[idx[j + 2]], w[idx[j + 3]],
                                                          v, zero)
        j += 4
    for u in range(j, S):
        res[u] = dot_plus(v, w[idx[u]], zero)


@njit(inline="always", **JIT)
def pair_sum(o, c, v, order, s, e, S):
    """o = Σ_{m in [s, e)} c[order[m]] · v[order[m] // S] (pairs numbered r·S + j), four per pass."""
    o[:] = 0
    m = s
    while m + 4 <= e:
        q0, q1, q2, q3 = order[m], order[m + 1], order[m + 2], order[m + 3]
        axpy4(o, c[q0], v[q0 // S], c[q1], v[q1 // S], c[q2], v[q2 // S], c[q3], v[q3 // S])
        m += 4
    for u in range(m, e):
        axpy(o, c[order[u]], v[order[u] // S])


@njit(parallel=True, **JIT)
def dots(v, w, idx, out):
    """out (B, S) = v[r] · w[idx[r, s]]. v (B, F), w (R, F) with R >= 1, idx (B, S)."""
    B = idx.shape[0]
    zero = like(w[0, 0], 0.0)
    for c in prange((B + CHUNK - 1) // CHUNK):
        for r in range(c * CHUNK, min(B, (c + 1) * CHUNK)):
            row_dots(v[r], w, idx[r], zero, out[r])


@njit(parallel=True, **JIT)
def combine(c, w, idx, out):
    """out (B, F) = Σ_s c[r, s] · w[idx[r, s]]. c, idx (B, S), w (R, F)."""
    B = idx.shape[0]
    for t in prange((B + CHUNK - 1) // CHUNK):
        for r in range(t * CHUNK, min(B, (t + 1) * CHUNK)):
            o = out[r]
            o[:] = 0
            gather_gemv(o, c[r], w, idx[r])


@njit(parallel=True, **JIT)
def grouped_sums(c, v, S, order, starts, blocks, gw):
    """gw[e] = Σ c[r·S + s] · v[r] over the pairs with idx[r, s] = e (zero for rows no pair uses).
    c (B·S,) flattened; order, starts: the pairs grouped by row; blocks (T + 1,): row ranges
    [blocks[t], blocks[t+1]) done in parallel, each gw row by one thread. gw (R, F)."""
    for t in prange(blocks.shape[0] - 1):
        for e in range(blocks[t], blocks[t + 1]):
            pair_sum(gw[e], c, v, order, starts[e], starts[e + 1], S)
