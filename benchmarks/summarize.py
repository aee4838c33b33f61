"""The README's kernel table from the outputs of ``bash benchmarks/run_all.sh``.

    .venv/bin/python benchmarks/summarize.py [benchmarks/results]

Reads the ``fastff bench`` tables in ``nt_1x11*.txt`` / ``fff_d8_l16*.txt`` and prints one markdown
row per (layer, batch, threads): dense ms and the speed-up of the layer call (``cpu``), the
backend call (``cpu-kernel``) and the numba kernel alone (``cpu-numba``).
"""
from __future__ import annotations

import sys
from pathlib import Path

RUNS = {"nt_1x11": "NeuronTree 1x11", "fff_d8_l16": "FFF d8 l16"}


def read_table(path: Path) -> dict[tuple[int, str], float]:
    """(batch, backend) -> ms from one ``fastff bench`` table."""
    rows, header = {}, None
    for line in path.read_text().splitlines():
        cols = line.split()
        if cols[:2] == ["layer", "batch"]:
            header = cols
        elif header and len(cols) == len(header) and cols[1].isdigit():
            row = dict(zip(header, cols))
            rows[int(row["batch"]), row["backend"]] = float(row["ms"])
    return rows


def main(results: Path) -> None:
    print("| layer | batch | threads | dense ms | layer × | backend × | kernel × |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run, title in RUNS.items():
        for suffix, threads in (("", 2), ("_t1", 1)):
            path = results / f"{run}{suffix}.txt"
            if not path.exists():
                continue
            ms = read_table(path)
            for batch in sorted({b for b, _ in ms}):
                dense = ms[batch, "dense"]
                ratios = [f"{dense / ms[batch, k]:.0f}" for k in ("cpu", "cpu-kernel", "cpu-numba")]
                print(f"| {title} | {batch} | {threads} | {dense:.3g} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
