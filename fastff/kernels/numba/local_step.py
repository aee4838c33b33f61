"""numba kernel of the local optimisers' fused step (``fastff.training.optim``: LocalSGD,
LocalAdam). Plain IEEE arithmetic (no fastmath): a NaN or inf gradient reaches the parameter as
it does on the torch path."""
from __future__ import annotations

import math

from numba import njit, prange


@njit(parallel=True, cache=True)
def local_step(p, g, acc, m, v, steps, pending, lbs, lr, b1, b2, eps, adam):
    """Per block row j: if pending[j] < lbs, acc[j] += g[j]; else step row j with
    (acc[j] + g[j])·lbs/pending[j] (SGD, or Adam with the row's own moments and step count)
    and clear acc[j]. All arrays (blocks, cols) except steps, pending (blocks,); m, v, steps
    are empty for SGD."""
    for j in prange(p.shape[0]):
        if pending[j] < lbs:
            for c in range(p.shape[1]):
                acc[j, c] += g[j, c]
            continue
        scale = lbs / pending[j]
        if adam:
            steps[j] += 1
            c1, c2 = 1 - b1 ** steps[j], 1 - b2 ** steps[j]
        for c in range(p.shape[1]):
            gg = (acc[j, c] + g[j, c]) * scale
            acc[j, c] = 0
            if adam:
                m[j, c] = b1 * m[j, c] + (1 - b1) * gg
                v[j, c] = b2 * v[j, c] + (1 - b2) * gg * gg
                p[j, c] -= lr / c1 * m[j, c] / (math.sqrt(v[j, c] / c2) + eps)
            else:
                p[j, c] -= lr * gg
