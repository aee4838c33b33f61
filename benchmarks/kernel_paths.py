"""Latency path vs throughput path of the numba kernels, single thread, CPU time per row.

    .venv/bin/python benchmarks/kernel_paths.py [--rows 4096] [--dim 768]

Thread CPU time (``time.thread_time``) with one numba thread, so other processes on a shared
machine inflate the numbers less than wall-clock time would. Median of 7, interleaved
(``fastff.apps.timing.median_times``).
NeuronTree 1x11 and FFF depth 8 / leaf 16, GELU, float32.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import torch

import fastff
from fastff.apps.timing import median_times
from fastff.functional import activation_code
from fastff.kernels import cpu
from fastff.kernels.numba import common, infer
from fastff.kernels.numba.common import group_tiles


def cpu_times(fns: dict, repeats: int = 7) -> dict:
    return median_times(fns, repeats, warmup=1, clock=time.thread_time)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--dim", type=int, default=768)
    args = p.parse_args()
    numba.set_num_threads(1)
    torch.manual_seed(0)
    B, d, code = args.rows, args.dim, activation_code("gelu")
    x = torch.randn(B, d).numpy()
    out = np.empty((B, d), np.float32)

    nt = fastff.NeuronTree(d, d, 11, 1)
    wi, bi, wo, bo = cpu.weights_np(nt.w_in, nt.b_in, nt.w_out, nt.b_out)
    split, tile = cpu.nt_split(12, (d + d) * 4), cpu.tile_rows(B, d * 4)
    pre, nodes = np.empty((B, 1, 12), np.float32), np.empty((B, 1, 12), np.int64)
    no_flip, no_bias = np.zeros((0, 1, 12), np.uint8), np.zeros((0, 0), np.float32)

    def grouped(s):
        order, tiles = common.route(x, wi, bi, no_flip, s, tile, pre, nodes)
        infer.nt_outputs(pre, nodes, wo, bo, code, order, tiles, out)

    fns = {"per-row walk": lambda: infer.nt_serial(x, wi, bi, wo, bo, no_bias, False, 12, code, out)}
    for s in sorted({split - 2, split, split + 1} & set(range(1, 12))):
        fns[f"grouped, split {s}" + (" (auto)" if s == split else "")] = (lambda s: lambda: grouped(s))(s)
    fns["grouped descent only (no outputs)"] = lambda: common.route(x, wi, bi, no_flip, split, tile, pre, nodes)
    same = np.repeat(x[:1], B, axis=0)
    fns["per-row walk, every row on one path"] = lambda: infer.nt_serial(same, wi, bi, wo, bo, no_bias, False, 12, code, out)
    report("NeuronTree 1x11", cpu_times(fns), B)

    ff = fastff.FFF(d, d, 8, 16, activation="gelu")
    w = cpu.weights_np(ff.node_w, ff.node_b, ff.w1, ff.b1, ff.w2, ff.b2)
    leaf, gate = np.empty(B, np.int64), np.empty(B, np.float32)

    def routing():
        pre, nodes, _, _ = cpu.route(x, w[0][None], w[1][None], None, 8, d * 4)
        infer.fff_reached(pre, nodes, 255, False, leaf, gate)

    def tiles():
        routing()
        order, t = group_tiles(leaf, 256, cpu.LEAF_TILE)
        infer.fff_tiles(x, *w[2:], code, False, gate, order, t, out)

    fns = {"per-row walk": lambda: infer.fff_serial(x, w[0], w[1], 8, *w[2:], code, False, out),
           "routing pass only (grouped descent)": routing,
           "leaf-grouped tiles (route + sort + tiles)": tiles}
    report("FFF depth 8 leaf 16", cpu_times(fns), B)


def report(title: str, times: dict, rows: int) -> None:
    print(f"{title}, {rows} rows, 1 thread: CPU time per row")
    for name, t in times.items():
        print(f"  {name:45s} {t / rows * 1e9:8.0f} ns/row   ({t * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
