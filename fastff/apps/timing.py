"""The one timer every command uses: interleaved medians.

Candidates are timed in rounds; each round calls every candidate once, in a new seeded random
order (what runs right after a heavy candidate pays for its cache evictions and its OpenMP
workers still spinning, so a fixed order would favour some), after ``warmup`` untimed rounds.
Background load on a shared machine then hits all candidates alike, and the median ignores
the odd slow call. Ratios between candidates of one call are the numbers to report.

Once CUDA is initialised in the process (a model or tensor was put on a GPU), the clock is read
after ``torch.cuda.synchronize()``, so a time covers the GPU work its call queued, not only the
launches; in a CPU-only process the clock is read as it is.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable, Mapping

import torch


def synced(clock: Callable[[], float]) -> Callable[[], float]:
    """``clock``, read after waiting for the queued GPU work when CUDA is in use in this process."""
    if not torch.cuda.is_initialized():
        return clock

    def read() -> float:
        torch.cuda.synchronize()
        return clock()
    return read


def median_times(fns: Mapping[str, Callable[[], Any]], repeats: int | Mapping[str, int], warmup: int = 2,
                 rewarm: bool = False, seed: int = 0, progress: Callable[[int, int], Any] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 setup: Mapping[str, Callable[[], Any]] | None = None) -> dict[str, float]:
    """Median time (seconds of ``clock``: wall time by default; ``time.thread_time`` counts only
    this thread's CPU time) of each zero-argument callable in ``fns``, timed interleaved.

    repeats: timed calls per candidate (one int, or per name: a candidate stops being timed
    after its own count). rewarm: each timed call directly follows an untimed call of the same
    candidate, so it runs with its own data in cache (steady state) rather than after another
    candidate streamed its data through the cache. setup: per name, a callable run untimed right
    before each (warm-up or timed) call of that candidate, e.g. the backward pass whose gradients
    an optimiser step consumes. progress(round, rounds) is called after each round.
    """
    counts = {name: repeats for name in fns} if isinstance(repeats, int) else dict(repeats)
    if not fns or min(counts.values()) < 1:
        raise ValueError(f"median_times needs candidates and repeats >= 1, got {len(fns)} and {counts}")
    setup = setup or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    clock = synced(clock)          # after the warm-up, which may have moved work to a GPU
    names, rng, rounds = list(fns), random.Random(seed), max(counts.values())
    for r in range(rounds):
        rng.shuffle(names)
        for name in names:
            if r >= counts[name]:
                continue
            fn = fns[name]
            if rewarm:
                fn()
            if name in setup:
                setup[name]()
            start = clock()
            fn()
            times[name].append(clock() - start)
        if progress:
            progress(r + 1, rounds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def best_time(fn: Callable[[], Any], seconds: float) -> float:
    """Fastest of repeated calls of ``fn`` within about ``seconds`` (after one untimed call): for
    measuring a machine's peak rate, where the best run is the one with no interference."""
    fn()
    clock = synced(time.perf_counter)
    best, end = float("inf"), time.perf_counter() + seconds
    while True:
        start = clock()
        fn()
        best = min(best, clock() - start)
        if time.perf_counter() > end:
            return best
