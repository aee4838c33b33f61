"""The README's kernel table from the outputs of ``bash benchmarks/run_all.sh``.

    .venv/bin/python benchmarks/summarize.py [benchmarks/results]

Reads the ``fastff bench`` tables of ``RUNS`` (and their ``_t1`` one-thread runs) and prints one
markdown row per (layer, batch, threads): dense ms, the speed-up of the layer call (``cpu``), the
backend call (``cpu-kernel``) and the numba kernel alone (``cpu-numba``), and the layer call's
time against the bound the bench computed (memory or compute, whichever is larger).
"""
from __future__ import annotations

import sys
from pathlib import Path

RUNS = {"nt_1x11": "NeuronTree 1x11", "fff_d8_l16": "FFF d8 l16", "lm_nt_1x8_d256": "NeuronTree 1x8 dim 256",
        "lm_nt_1x11_d256": "NeuronTree 1x11 dim 256", "lm_nt_4x8_d256": "NeuronTree 4x8 dim 256",
        "lm_nt_1x8_d768": "NeuronTree 1x8", "lm_nt_4x8_d768": "NeuronTree 4x8"}


def read_table(path: Path) -> dict[tuple[int, str], dict]:
    """(batch, backend) -> the row (column -> text) of one ``fastff bench`` table."""
    rows, header = {}, None
    for line in path.read_text().splitlines():
        cols = line.split()
        if cols[:2] == ["layer", "batch"]:
            header = cols
        elif header and len(cols) == len(header) and cols[1].isdigit():
            row = dict(zip(header, cols))
            rows[int(row["batch"]), row["backend"]] = row
    return rows


def main(results: Path) -> None:
    print("| layer | batch | threads | dense ms | layer × | backend × | kernel × | layer ms | bound ms | % of bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for run, title in RUNS.items():
        for suffix, threads in (("", 2), ("_t1", 1)):
            path = results / f"{run}{suffix}.txt"
            if not path.exists():
                continue
            rows = read_table(path)
            for batch in sorted({b for b, _ in rows}):
                dense, cpu = float(rows[batch, "dense"]["ms"]), rows[batch, "cpu"]
                ratios = [f"{dense / float(rows[batch, k]['ms']):.0f}" for k in ("cpu", "cpu-kernel", "cpu-numba")]
                bound = "" if cpu.get("bound_ms", "-") == "-" else \
                    f"{float(cpu['bound_ms']):.3g} | {float(cpu['pct_of_bound']):.0f} ({cpu['bound']})"
                print(f"| {title} | {batch} | {threads} | {dense:.3g} | " + " | ".join(ratios)
                      + f" | {float(cpu['ms']):.3g} | {bound or '- | -'} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
