"""Native CPU inference kernels (backend ``"cpu"``): numba, float32 and float64, hard routing only.

- latency path (small batches): one tree walk per row, rows in parallel (or on the calling
  thread when the job is too small to wake the pool), dot products and output updates SIMD over
  features; a row's input and output stay in L1, nothing is gathered or copied.
- NeuronTree throughput path (``B >= THROUGHPUT_MIN_ROWS``): walk the top ``split`` levels of
  every row, counting-sort rows by the node reached there, finish the walks group by group, so
  each group's subtree weights (<= ``SUBTREE_BYTES``) stay in L2. Bit-identical to the walk.
- FFF throughput path: route every row, counting-sort rows by leaf, evaluate tiles of
  <= ``LEAF_TILE`` rows of one leaf as a small GEMM with the leaf's weights hot in cache
  (hand-written loops); leaves of ``GEMM_MIN_LEAF`` neurons or more run tiles of <= ``GEMM_TILE``
  rows as two BLAS GEMMs.

Shapes as in ``fastff.kernels.reference``: x (B, I); FFF node_w (N, I), node_b (N,),
w1 (L, I, H), b1 (L, H), w2 (L, H, O), b2 (L, O); NeuronTree w_in (K, M, I), b_in (K, M),
w_out (K, M, O), b_out (O,) or None. Inference only: the outputs carry no gradient.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.core.extending import overload
from numba.np.numpy_support import as_dtype

from ..functional import ACTIVATIONS
from ._threads import single_threaded_blas, with_torch_threads

# Activation name -> code understood by the kernels; every name in ACTIVATIONS is supported.
ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "tanh": 4, "sigmoid": 5, "identity": 6}
if set(ACT_CODES) != set(ACTIVATIONS):  # pragma: no cover - guards future edits of ACTIVATIONS
    raise ImportError("fastff.kernels.cpu: every activation in ACTIVATIONS needs a kernel code")
DTYPES = (torch.float32, torch.float64)
# Batches from this size on take the grouped throughput paths.
THROUGHPUT_MIN_ROWS = 256
# NeuronTree throughput path: a group's subtree (w_in + w_out rows) must fit in this many bytes
# (about half of one core's L2); rows per group-tile in the parallel loop.
SUBTREE_BYTES = 1 << 19
NT_TILE = 16
# Smaller jobs (rows x weight bytes touched per row) run on the calling thread only.
PARALLEL_MIN_BYTES = 1 << 19
# Rows per FFF leaf tile (the M of each small per-leaf GEMM).
LEAF_TILE = 32
# Leaves at least this wide run their tiles of up to GEMM_TILE rows as BLAS GEMMs (measured at
# dim 384-768, 4096-8192 rows: equal speed at leaf 16, 1.5x faster at 64, 2.6x at 512).
GEMM_MIN_LEAF = 32
GEMM_TILE = 256

# Reassociation and contraction only: lets LLVM vectorise reductions and fuse multiply-adds,
# while NaN / inf keep their IEEE meaning (the routing test `a >= 0` must stay exact).
_FM = {"reassoc", "contract"}
_JIT = dict(fastmath=_FM, cache=True, nogil=True)


def _like(ref, v):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_like)
def _like_overload(ref, v):
    """``v`` cast to the scalar type of ``ref`` (keeps float32 loops in float32)."""
    cast = as_dtype(ref).type
    return lambda ref, v: cast(v)


@njit(inline="always", **_JIT)
def _act(a, code):
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
    return _like(a, r)


_SQRT_HALF, _INV_SQRT_2PI, _TANH_K = 1 / math.sqrt(2), 1 / math.sqrt(2 * math.pi), math.sqrt(2 / math.pi)


@njit(inline="always", fastmath=True)
def _act_grad(a, code):
    """(activation, its derivative) at ``a`` for a code from ``ACT_CODES``, in ``a``'s type
    (the training kernels' version of ``_act``)."""
    if code == 0:
        return (a, 1.0) if a > 0 else (0.0 * a, 0.0)
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


@njit(inline="always", **_JIT)
def _dot_plus(x, w, b):
    """b + x·w over the last axis (vectorised reduction)."""
    s = b
    for i in range(x.shape[0]):
        s += x[i] * w[i]
    return s


@njit(inline="always", **_JIT)
def _axpy(o, a, w):
    """o += a · w."""
    for j in range(o.shape[0]):
        o[j] += a * w[j]


@njit(inline="always", **_JIT)
def _gemv_acc(o, a, w):
    """o (n,) += a (K,) @ w (K, n).

    Four rows of w per pass over o (fewer loads/stores of o)."""
    K = a.shape[0]
    k = 0
    while k + 4 <= K:
        a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
        w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
        for j in range(o.shape[0]):
            o[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]
        k += 4
    for u in range(k, K):
        _axpy(o, a[u], w[u])


# ----------------------------------------------------------------------------- NeuronTree

@njit(inline="always", **_JIT)
def _nt_row(x, w_in, b_in, w_out, b_out, levels, code, o):
    """One row through all K trees: o (O,) = b_out + sum of act(a)·w_out over visited nodes."""
    if b_out.shape[0]:
        o[:] = b_out
    else:
        o[:] = 0
    for k in range(w_in.shape[0]):
        node = 0
        for _ in range(levels):
            a = _dot_plus(x, w_in[k, node], b_in[k, node])
            _axpy(o, _act(a, code), w_out[k, node])
            node = 2 * node + 1 + (a >= 0)


@njit(**_JIT)
def _nt_serial(x, w_in, b_in, w_out, b_out, levels, code, out):
    for r in range(x.shape[0]):
        _nt_row(x[r], w_in, b_in, w_out, b_out, levels, code, out[r])


@njit(parallel=True, **_JIT)
def _nt_parallel(x, w_in, b_in, w_out, b_out, levels, code, out):
    for r in prange(x.shape[0]):
        _nt_row(x[r], w_in, b_in, w_out, b_out, levels, code, out[r])


@njit(parallel=True, **_JIT)
def _nt_prefix(x, w_in, b_in, k, split, acts, key):
    """Throughput pass 1 for tree k: the first ``split`` levels of every row's walk; stores
    their pre-activations in acts (B, split) and the node reached on level ``split`` in key (B,),
    numbered within that level."""
    for r in prange(x.shape[0]):
        node = 0
        for t in range(split):
            a = _dot_plus(x[r], w_in[k, node], b_in[k, node])
            acts[r, t] = a
            node = 2 * node + 1 + (a >= 0)
        key[r] = node - ((1 << split) - 1)


@njit(parallel=True, **_JIT)
def _nt_suffix(x, w_in, b_in, w_out, k, split, levels, code, acts, order, tiles, out):
    """Throughput pass 2 for tree k: rows grouped by their level-``split`` node (``order``,
    ``tiles`` from ``_group_tiles``) finish their walks one after another, so the subtree under
    that node (its w_in and w_out rows) stays in L2 across the group. out (B, O) += tree k."""
    for t in prange(tiles.shape[0]):
        for m in range(tiles[t, 1], tiles[t, 2]):
            r = order[m]
            o = out[r]
            node = 0
            for u in range(levels):
                a = acts[r, u] if u < split else _dot_plus(x[r], w_in[k, node], b_in[k, node])
                _axpy(o, _act(a, code), w_out[k, node])
                node = 2 * node + 1 + (a >= 0)


@njit(**_JIT)
def _nt_throughput(x, w_in, b_in, w_out, b_out, levels, split, tile, code, out):
    """NeuronTree for large batches: per tree, route the top ``split`` levels, counting-sort
    rows by the node reached there, then finish each group's walks back to back."""
    for r in range(x.shape[0]):
        if b_out.shape[0]:
            out[r] = b_out
        else:
            out[r] = 0
    acts = np.empty((x.shape[0], split), x.dtype)
    key = np.empty(x.shape[0], np.int64)
    for k in range(w_in.shape[0]):
        _nt_prefix(x, w_in, b_in, k, split, acts, key)
        order, tiles = _group_tiles(key, 1 << split, tile)
        _nt_suffix(x, w_in, b_in, w_out, k, split, levels, code, acts, order, tiles, out)


# ----------------------------------------------------------------------------- FFF

@njit(inline="always", **_JIT)
def _fff_leaf(x, node_w, node_b, depth):
    """Hard descent of one row -> leaf index."""
    node = 0
    for _ in range(depth):
        node = 2 * node + 1 + (_dot_plus(x, node_w[node], node_b[node]) >= 0)
    return node - node_w.shape[0]


@njit(inline="always", **_JIT)
def _fff_eval_leaf(x, w1, b1, w2, b2, code, h, o):
    """o (O,) = b2 + act(x·w1 + b1)·w2 for one leaf's weights; h (H,) is scratch."""
    h[:] = b1
    _gemv_acc(h, x, w1)
    for k in range(h.shape[0]):
        h[k] = _act(h[k], code)
    o[:] = b2
    _gemv_acc(o, h, w2)


@njit(inline="always", **_JIT)
def _fff_row(x, node_w, node_b, depth, w1, b1, w2, b2, code, h, o):
    leaf = _fff_leaf(x, node_w, node_b, depth)
    _fff_eval_leaf(x, w1[leaf], b1[leaf], w2[leaf], b2[leaf], code, h, o)


@njit(**_JIT)
def _fff_serial(x, node_w, node_b, depth, w1, b1, w2, b2, code, out):
    h = np.empty(w1.shape[2], x.dtype)
    for r in range(x.shape[0]):
        _fff_row(x[r], node_w, node_b, depth, w1, b1, w2, b2, code, h, out[r])


@njit(parallel=True, **_JIT)
def _fff_parallel(x, node_w, node_b, depth, w1, b1, w2, b2, code, out):
    for r in prange(x.shape[0]):
        h = np.empty(w1.shape[2], x.dtype)
        _fff_row(x[r], node_w, node_b, depth, w1, b1, w2, b2, code, h, out[r])


@njit(parallel=True, **_JIT)
def _fff_route(x, node_w, node_b, depth, leaf):
    for r in prange(x.shape[0]):
        leaf[r] = _fff_leaf(x[r], node_w, node_b, depth)


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
def _group_tiles(key, n_keys, tile):
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


@njit(inline="always", **_JIT)
def _hidden4(x0, x1, x2, x3, w1t, b1, code, h):
    """h (4, H)[r, k] = act(x_r · w1t[k] + b1[k]) for four rows; each weight load feeds 4 FMAs."""
    for k in range(w1t.shape[0]):
        w = w1t[k]
        a0 = b1[k]
        a1, a2, a3 = a0, a0, a0
        for i in range(w.shape[0]):
            wi = w[i]
            a0 += x0[i] * wi
            a1 += x1[i] * wi
            a2 += x2[i] * wi
            a3 += x3[i] * wi
        h[0, k], h[1, k], h[2, k], h[3, k] = _act(a0, code), _act(a1, code), _act(a2, code), _act(a3, code)


@njit(inline="always", **_JIT)
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
        _axpy(o0, h[0, u], w2[u])
        _axpy(o1, h[1, u], w2[u])
        _axpy(o2, h[2, u], w2[u])
        _axpy(o3, h[3, u], w2[u])


@njit(parallel=True, **_JIT)
def _fff_tiles(x, w1, b1, w2, b2, code, order, tiles, out):
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
                h1[k] = _act(_dot_plus(xr, w1t[k], b1[leaf, k]), code)
            o = out[order[q]]
            o[:] = b2[leaf]
            _gemv_acc(o, h1, w2[leaf])


@njit(parallel=True, **_JIT)
def _fff_tiles_gemm(x, w1, b1, w2, b2, code, order, tiles, out):
    """Wide leaves: each tile (rows of one leaf) as two BLAS GEMMs on its gathered rows,
    out[rows] = act(X_t @ w1[leaf] + b1[leaf]) @ w2[leaf] + b2[leaf]. BLAS must be
    single-threaded here (``single_threaded_blas``): the tiles already run in parallel."""
    for t in prange(tiles.shape[0]):
        leaf, s, e = tiles[t, 0], tiles[t, 1], tiles[t, 2]
        xt = np.empty((e - s, x.shape[1]), x.dtype)
        for m in range(s, e):
            xt[m - s] = x[order[m]]
        h = np.dot(xt, w1[leaf])
        for m in range(e - s):
            for k in range(h.shape[1]):
                h[m, k] = _act(h[m, k] + b1[leaf, k], code)
        o = np.dot(h, w2[leaf])
        for m in range(s, e):
            out[order[m]] = o[m - s] + b2[leaf]


# ----------------------------------------------------------------------------- torch glue

def check_tensors(*tensors) -> None:
    """All given tensors (None skipped) must be CPU tensors of one dtype in ``DTYPES``."""
    dtype = tensors[0].dtype
    if dtype in DTYPES and all(t is None or (t.is_cpu and t.dtype is dtype) for t in tensors):
        return
    present = [t for t in tensors if t is not None]
    for t in present:
        if t.device.type != "cpu":
            raise ValueError(f"the 'cpu' backend runs CPU tensors only, got a tensor on {t.device}; "
                             f"use backend='torch' (or 'auto') for other devices")
        if t.dtype not in DTYPES:
            raise TypeError(f"the 'cpu' backend supports float32 and float64, got {t.dtype}")
    raise TypeError("the 'cpu' backend needs the input and all weights in one dtype, got "
                    + ", ".join(sorted({str(t.dtype) for t in present})))


def _np(t: torch.Tensor) -> np.ndarray:
    """C-contiguous numpy view (or copy, if ``t`` is not contiguous) of a CPU tensor."""
    if not t.requires_grad and t.is_contiguous():
        return t.numpy()
    return t.detach().contiguous().numpy()


# A layer's weight tensors -> their checked numpy views, so repeated calls skip the checks and
# the torch->numpy conversions (most of a batch-1 call). Keyed by the id of the first weight; an
# entry is used only while every weight is the same tensor object with the same storage pointer,
# shape and strides (contiguous weights only). The views share memory, so in-place updates of
# the weights are seen. An entry dies with any of its tensors.
_prepared: dict[int, tuple] = {}  # id(weights[0]) -> (weakrefs, layouts, views, torch dtype)


def _layout(w: torch.Tensor | None) -> tuple:
    return (None, None, None) if w is None else (w.data_ptr(), w.shape, w.stride())


def _cached(weights: tuple) -> tuple | None:
    """The ``_prepared`` entry of ``weights`` if it is still valid."""
    hit = _prepared.get(id(weights[0]))
    if hit is None:
        return None
    for w, ref, (ptr, shape, stride) in zip(weights, hit[0], hit[1]):
        if w is None:
            if ref is not None:
                return None
        elif ref is None or ref() is not w or w.data_ptr() != ptr or w.shape != shape or w.stride() != stride:
            return None
    return hit


def weights_np(*weights) -> tuple:
    """Checked numpy views of ``weights`` (None stays None); see ``_prepared``. Raises like
    ``check_tensors`` for tensors the kernels cannot run."""
    hit = _cached(weights)
    if hit is not None:
        return hit[2]
    check_tensors(*weights)
    views = tuple(None if w is None else _np(w) for w in weights)
    if all(w is None or w.is_contiguous() for w in weights):
        key = id(weights[0])
        drop = lambda _, key=key: _prepared.pop(key, None)
        refs = tuple(None if w is None else weakref.ref(w, drop) for w in weights)
        _prepared[key] = (refs, tuple(map(_layout, weights)), views, weights[0].dtype)
    return views


def usable_views(x: torch.Tensor, weights: tuple) -> tuple | None:
    """The numpy views of ``weights`` if the kernels can run ``x`` with them eagerly (CPU tensors
    of one dtype in ``DTYPES``, not traced), else None. Gradients are not looked at."""
    if not x.is_cpu or _tracing(x):
        return None
    hit = _cached(weights)
    if hit is not None:
        return hit[2] if hit[3] is x.dtype else None
    if x.dtype in DTYPES and all(w is None or (w.is_cpu and w.dtype is x.dtype) for w in weights):
        return weights_np(*weights)
    return None


_NO_BIAS = {np.dtype(dt): np.zeros(0, dt) for dt in (np.float32, np.float64)}


def _input_np(x: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """numpy view of the input, checked against the weights' dtype."""
    if not x.is_cpu or x.dtype not in DTYPES:
        check_tensors(x)
    xa = _np(x)
    if xa.dtype != like.dtype:
        check_tensors(x, torch.from_numpy(like[:0]))
    return xa


def _code(activation: str) -> int:
    code = ACT_CODES.get(activation)
    if code is None:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACT_CODES))}; got {activation!r}")
    return code


def _parallel(rows: int, bytes_per_row: int) -> bool:
    """Wake the thread pool only when the work amortises it (~0.5 MB of weights touched)."""
    return rows * bytes_per_row >= PARALLEL_MIN_BYTES and torch.get_num_threads() > 1


def fff_run(xa: np.ndarray, weights: tuple, code: int, out: np.ndarray) -> None:
    """The numba part of ``fff_hard``: out (B, O) = FFF(xa (B, I)) for ``weights`` =
    numpy (node_w, node_b, w1, b1, w2, b2) and an activation code from ``ACT_CODES``."""
    nw, nb, a1, c1, a2, c2 = weights
    rows = xa.shape[0]
    if rows == 0:
        return
    depth = a1.shape[0].bit_length() - 1
    if rows >= THROUGHPUT_MIN_ROWS:
        with_torch_threads(_fff_throughput, xa, nw, nb, depth, a1, c1, a2, c2, code, out)
        return
    _, inp, hidden = a1.shape
    row_bytes = (depth * inp + hidden * (inp + a2.shape[2])) * xa.itemsize
    if _parallel(rows, row_bytes):
        with_torch_threads(_fff_parallel, xa, nw, nb, depth, a1, c1, a2, c2, code, out)
    else:
        _fff_serial(xa, nw, nb, depth, a1, c1, a2, c2, code, out)


def _fff_throughput(xa, nw, nb, depth, a1, c1, a2, c2, code, out) -> None:
    """Route every row, group rows by leaf, evaluate tiles of one leaf: hand-written loops for
    narrow leaves, two BLAS GEMMs per tile from ``GEMM_MIN_LEAF`` on."""
    leaf = np.empty(xa.shape[0], np.int64)
    _fff_route(xa, nw, nb, depth, leaf)
    if a1.shape[2] < GEMM_MIN_LEAF:
        order, tiles = _group_tiles(leaf, a1.shape[0], LEAF_TILE)
        _fff_tiles(xa, a1, c1, a2, c2, code, order, tiles, out)
        return
    order, tiles = _group_tiles(leaf, a1.shape[0], GEMM_TILE)
    with single_threaded_blas():
        _fff_tiles_gemm(xa, a1, c1, a2, c2, code, order, tiles, out)


def neuron_tree_run(xa: np.ndarray, weights: tuple, code: int, out: np.ndarray) -> None:
    """The numba part of ``neuron_tree``: out (B, O) = NeuronTree(xa (B, I)) for ``weights`` =
    numpy (w_in, b_in, w_out, b_out or None) and an activation code from ``ACT_CODES``."""
    wi, bi, wo, bo = weights
    rows = xa.shape[0]
    if rows == 0:
        return
    if bo is None:
        bo = _NO_BIAS[xa.dtype]
    levels = (wi.shape[1] + 1).bit_length() - 1
    node_bytes = (wi.shape[2] + wo.shape[2]) * xa.itemsize
    if rows >= THROUGHPUT_MIN_ROWS:
        split = nt_split(levels, node_bytes)
        if split > 0:
            with_torch_threads(_nt_throughput, xa, wi, bi, wo, bo, levels, split, NT_TILE, code, out)
            return
    if _parallel(rows, wi.shape[0] * levels * node_bytes):
        with_torch_threads(_nt_parallel, xa, wi, bi, wo, bo, levels, code, out)
    else:
        _nt_serial(xa, wi, bi, wo, bo, levels, code, out)


def _output(rows: int, features: int, like: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """A fresh (rows, features) output as a tensor and its numpy view."""
    out = np.empty((rows, features), like.dtype)
    return torch.from_numpy(out), out


def fff_eager(x: torch.Tensor, weights: tuple, activation: str) -> torch.Tensor:
    """Hard FFF inference on numpy ``weights`` (from ``weights_np``). x (B, I) -> (B, O)."""
    xa = _input_np(x, weights[2])
    code = _code(activation)
    y, out = _output(xa.shape[0], weights[4].shape[-1], weights[2])
    fff_run(xa, weights, code, out)
    return y


def neuron_tree_eager(x: torch.Tensor, weights: tuple, activation: str) -> torch.Tensor:
    """NeuronTree inference on numpy ``weights`` (from ``weights_np``). x (B, I) -> (B, O)."""
    xa = _input_np(x, weights[0])
    code = _code(activation)
    y, out = _output(xa.shape[0], weights[2].shape[-1], weights[0])
    neuron_tree_run(xa, weights, code, out)
    return y


def nt_split(levels: int, node_bytes: int) -> int:
    """Level at which the throughput path groups rows: the shallowest one whose subtrees
    (``2**(levels - split) - 1`` neurons of ``node_bytes``) fit in ``SUBTREE_BYTES``; at most
    ``levels - 1``. 0 means the whole tree fits (then the per-row walk is already cache-hot)."""
    fit = (SUBTREE_BYTES // node_bytes + 1).bit_length() - 1   # levels of a subtree that fits
    return min(levels - 1, max(0, levels - fit))


# torch.library custom ops: torch.compile and torch.export see one opaque op per layer call.
@torch.library.custom_op("fastff::fff_hard", mutates_args=())
def fff_hard_op(x: torch.Tensor, node_w: torch.Tensor, node_b: torch.Tensor, w1: torch.Tensor,
                b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, activation: str) -> torch.Tensor:
    """``torch.ops.fastff.fff_hard``: hard FFF inference on the numba kernels. -> (B, O)."""
    return fff_eager(x, weights_np(node_w, node_b, w1, b1, w2, b2), activation)


@fff_hard_op.register_fake
def _fff_hard_fake(x, node_w, node_b, w1, b1, w2, b2, activation):
    return x.new_empty(x.shape[0], w2.shape[-1])


@torch.library.custom_op("fastff::neuron_tree_hard", mutates_args=())
def neuron_tree_op(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                   b_out: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """``torch.ops.fastff.neuron_tree_hard``: NeuronTree inference on the numba kernels. -> (B, O)."""
    return neuron_tree_eager(x, weights_np(w_in, b_in, w_out, b_out), activation)


@neuron_tree_op.register_fake
def _neuron_tree_fake(x, w_in, b_in, w_out, b_out, activation):
    return x.new_empty(x.shape[0], w_out.shape[-1])


def _tracing(x: torch.Tensor) -> bool:
    """True under torch.compile / torch.export tracing (then the custom op must be called)."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str) -> torch.Tensor:
    """Hard FFF inference. x (B, I) -> (B, O); same result as ``reference.fff_hard``.

    Eager calls run the kernels directly (the op dispatcher costs more than a batch-1 kernel);
    traced calls go through ``torch.ops.fastff.fff_hard``, which runs the same code."""
    if _tracing(x):
        return torch.ops.fastff.fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation)
    return fff_eager(x, weights_np(node_w, node_b, w1, b1, w2, b2), activation)


def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str) -> torch.Tensor:
    """NeuronTree inference. x (B, I) -> (B, O); same result as ``reference.neuron_tree``.
    Eager / traced as in ``fff_hard`` (op ``torch.ops.fastff.neuron_tree_hard``)."""
    if _tracing(x):
        return torch.ops.fastff.neuron_tree_hard(x, w_in, b_in, w_out, b_out, activation)
    return neuron_tree_eager(x, weights_np(w_in, b_in, w_out, b_out), activation)
