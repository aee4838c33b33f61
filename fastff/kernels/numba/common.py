"""Pieces every numba kernel shares: the activation table by code, the routing rule, vector
primitives and the counting sort that groups rows.

Activation codes are ``fastff.functional.ACTIVATION_CODES``: 0 relu, 1 gelu, 2 gelu_tanh,
3 silu, 4 tanh, 5 sigmoid, 6 identity.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit
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
def child(node, a):
    """The routing rule: heap-order child of ``node``, right iff the pre-activation ``a >= 0``."""
    return 2 * node + 1 + (a >= 0)


@njit(inline="always", **JIT)
def child_flipped(node, a, flip):
    """``child`` with the decision swapped where ``flip`` (region leak) is set."""
    return 2 * node + 1 + ((a >= 0) ^ (flip != 0))


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


@njit(inline="always", fastmath=True)
def act_grad(a, code):
    """(activation, its derivative) at ``a``, in ``a``'s type (the training kernels' ``act``)."""
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
def gemv_acc(o, a, w):
    """o (n,) += a (K,) @ w (K, n). Four rows of w per pass over o (fewer loads/stores of o)."""
    K = a.shape[0]
    k = 0
    while k + 4 <= K:
        a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
        w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
        for j in range(o.shape[0]):
            o[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]
        k += 4
    for u in range(k, K):
        axpy(o, a[u], w[u])


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
