"""Thread budget: torch and the numba kernels on one thread count (``set_threads``), kept in step.

numba's ``omp`` threading layer shares libgomp with PyTorch, so a numba parallel launch would
reset the OpenMP thread count that ``torch.get_num_threads()`` reports (and a numba kernel
would ignore ``torch.set_num_threads``). Kernels entered through ``with_torch_threads`` / ``follow_torch_threads`` use
torch's thread count and leave it as it was. BLAS calls made inside numba's parallel loops
(``np.dot`` -> scipy's OpenBLAS) must not start BLAS threads of their own: ``single_threaded_blas``.
"""
from __future__ import annotations

import functools

import numba
import torch
from threadpoolctl import ThreadpoolController


def with_torch_threads(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with numba on ``torch.get_num_threads()`` threads; torch's count is restored
    after (for numba kernels that may start its thread pool)."""
    n = torch.get_num_threads()
    want = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
    try:
        return fn(*args, **kwargs)
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def follow_torch_threads(fn):
    """Decorator form of ``with_torch_threads``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return with_torch_threads(fn, *args, **kwargs)

    return wrapper


def set_threads(n: int) -> None:
    """Run torch and the numba kernels on ``n`` threads (numba first: its start-up resets OpenMP's count)."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _blas_controller() -> ThreadpoolController:
    """The loaded BLAS libraries, scanned once, after loading the one numba's ``np.dot`` calls
    (scipy's, via ``scipy.linalg.cython_blas``): a controller only sees libraries loaded before it."""
    import scipy.linalg.cython_blas  # noqa: F401

    return ThreadpoolController()


def single_threaded_blas():
    """Context: BLAS libraries run on one thread (for BLAS calls inside numba ``prange`` loops)."""
    return _blas_controller().limit(limits=1, user_api="blas")
