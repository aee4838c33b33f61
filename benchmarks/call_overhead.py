"""Cost of one small-batch eval call (float32, dim 768, under ``torch.inference_mode()``) at four
levels, for NeuronTree 1x11 ("nt") and FFF d8 l16 ("fff") at 1 and 8 rows:

- ``kernel``: the numba part alone (``cpu.neuron_tree_run`` / ``cpu.fff_run`` on prepared arrays);
- ``backend``: the backend call on tensors (``cpu.neuron_tree`` / ``cpu.fff_hard``);
- ``layer-auto`` / ``layer-cpu``: ``layer(x)`` with backend ``"auto"`` / ``"cpu"``;
- ``linear``: ``nn.Linear(768, 768)(x)``, ``linear-op`` its ``F.linear`` alone and ``linear8``
  ``nn.Linear(768, 8)(x)`` (a module call with next to no compute): the reference for a module
  call's unavoidable overhead.

One torch thread by default (``--threads``): 1 to 8 rows then take the serial kernels, and
callgrind counts no OpenMP spin-waiting.

Wall time, interleaved medians of ``time.thread_time`` (noisy on a loaded machine)::

    .venv/bin/python benchmarks/call_overhead.py

Instructions per call, deterministic (valgrind's callgrind; ~4 minutes, mostly valgrind
importing torch)::

    .venv/bin/python benchmarks/call_overhead.py --callgrind

This reruns the script under ``valgrind --tool=callgrind --collect-atstart=no
--toggle-collect=qsort_r --dump-after=qsort_r`` with ``--measure``: each candidate's ``CALLS``
calls run inside one call of libc's ``qsort_r`` (via ``qsort`` from ctypes; its comparison
callback, ctypes' ``closure_fcn``, runs them), so callgrind counts exactly them, one dump per
candidate.
Valgrind does not emulate AVX-512, so the kernels run their AVX2 build (``NUMBA_CPU_NAME=haswell``
and the features in ``HASWELL``, compiled natively first and cached).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import glob
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import fastff
from fastff.functional import activation_code
from fastff.kernels import cpu

CALLS = 200
ROWS = (1, 8)
HASWELL = "+avx,+avx2,+bmi,+bmi2,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse4.1,+sse4.2"


def candidates() -> dict:
    """name -> zero-argument callable, for every layer, row count and level."""
    torch.manual_seed(0)
    layers = {"nt": (fastff.NeuronTree(768, 768, depth=11), ("w_in", "b_in", "w_out", "b_out")),
              "fff": (fastff.FFF(768, 768, depth=8, leaf_width=16), ("node_w", "node_b", "w1", "b1", "w2", "b2"))}
    fns = {}
    for rows in ROWS:
        x = torch.randn(rows, 768)
        for name, (layer, params) in layers.items():
            layer.eval()
            weights = tuple(getattr(layer, p) for p in params)
            views = cpu.weights_np(*weights)
            xa, out, code = x.numpy(), np.empty((rows, 768), np.float32), activation_code(layer.activation)
            pinned = copy.deepcopy(layer)
            pinned.backend = "cpu"
            if name == "nt":
                fns[f"{name} b{rows} kernel"] = lambda xa=xa, v=views, c=code, o=out: cpu.neuron_tree_run(xa, v, c, o)
                fns[f"{name} b{rows} backend"] = lambda x=x, w=weights, a=layer.activation: cpu.neuron_tree(x, *w, a)
            else:
                fns[f"{name} b{rows} kernel"] = lambda xa=xa, v=views, c=code, o=out: cpu.fff_run(xa, v, c, False, o)
                fns[f"{name} b{rows} backend"] = lambda x=x, w=weights, a=layer.activation: cpu.fff_hard(x, *w, a)
            fns[f"{name} b{rows} layer-auto"] = lambda x=x, m=layer: m(x)
            fns[f"{name} b{rows} layer-cpu"] = lambda x=x, m=pinned: m(x)
        linear, linear8 = nn.Linear(768, 768), nn.Linear(768, 8)
        fns[f"linear b{rows}"] = lambda x=x, m=linear: m(x)
        fns[f"linear-op b{rows}"] = lambda x=x, w=linear.weight, b=linear.bias: F.linear(x, w, b)
        fns[f"linear8 b{rows}"] = lambda x=x, m=linear8: m(x)
    return fns


def measure() -> None:
    """Run each candidate CALLS times inside one qsort_r call (see the module docstring)."""
    libc = ctypes.CDLL(None)
    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    pair = (ctypes.c_int * 2)()
    with torch.inference_mode():
        fns = candidates()
        for fn in fns.values():          # warm-up: kernels loaded, weights prepared
            for _ in range(3):
                fn()
        for fn in fns.values():
            def run(a, b, fn=fn):
                for _ in range(CALLS):
                    fn()
                return 0

            libc.qsort(pair, 2, ctypes.sizeof(ctypes.c_int), compare(run))   # 2 items: one comparison
    print("\n".join(fns))


def callgrind(threads: int) -> None:
    """Instructions per call of every candidate, from a callgrind run of ``measure``."""
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL}
    # compile (or load) the kernels for that CPU natively first: numba's compiler under valgrind
    # would take an hour
    subprocess.run([sys.executable, __file__, "--measure", "--threads", str(threads)], env=env, check=True,
                   capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        names = subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=qsort_r",
             "--dump-after=qsort_r", f"--callgrind-out-file={out}", sys.executable, __file__, "--measure",
             "--threads", str(threads)],
            env=env, check=True, capture_output=True, text=True,
        ).stdout.splitlines()
        totals = []   # of the dumps that ran the callback (numba's compiler calls qsort_r too)
        for dump in sorted(glob.glob(out + ".*"), key=lambda f: int(f.rsplit(".", 1)[1])):
            with open(dump) as f:
                text = f.read()
            if "closure_fcn" in text:
                totals.append(int(text.split("\ntotals: ", 1)[1].split()[0]))
        assert len(totals) == len(names), (len(totals), len(names))
        for name, total in zip(names, totals):
            print(f"{name:24s} {total / CALLS:12,.0f} instructions / call")


def wall() -> None:
    """Interleaved medians of thread CPU time per call, in µs."""
    from fastff.apps.timing import median_times

    with torch.inference_mode():
        fns = candidates()
        loops = {name: (lambda fn=fn: [fn() for _ in range(20)]) for name, fn in fns.items()}
        times = median_times(loops, 50, warmup=3, clock=time.thread_time)
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    for name, t in times.items():
        print(f"{name:24s} {t / 20 * 1e6:8.2f} µs / call")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callgrind", action="store_true", help="instructions per call (valgrind)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    fastff.threads.set_threads(args.threads)
    measure() if args.measure else callgrind(args.threads) if args.callgrind else wall()
