"""`fastff experiment frontier` on a tiny IDX dataset: recipe search on validation, the grid,
tree variants judged against the validation front, latency, the report and its target; plus
the routing-aware initialisation and the Pareto front."""
from __future__ import annotations

import json

import pytest
import torch

from fastff import FFF
from fastff.apps import experiment, report
from fastff.apps.cli import main
from fastff.functional import hard_path
from fastff.training.routing_init import pca_routing_init
from fastff.training.trainer import TrainConfig

from test_data import write_idx_dir


@pytest.fixture
def tiny_frontier(monkeypatch):
    monkeypatch.setattr(experiment, "FRONTIER_RECIPES", {"sgd": dict(lr=0.2), "adam": dict(optimizer="adam", lr=1e-2)})
    monkeypatch.setattr(experiment, "FRONTIER_SEARCH", {"dense": dict(width=4), "fff": dict(width=8, leaf=2),
                                                        "neuron-tree": dict(width=7), "moe": dict(width=8, leaf=4)})
    monkeypatch.setattr(experiment, "FRONTIER_GRID", {"dense": [dict(width=4), dict(width=8)],
                                                      "fff": [dict(width=8, leaf=2)],
                                                      "neuron-tree": [dict(width=7), dict(width=6, trees=2)],
                                                      "moe": [dict(width=8, leaf=4)]})
    monkeypatch.setattr(experiment, "FRONTIER_VARIANTS", [(dict(width=16, leaf=2), "pca", dict(routing_init="pca")),
                                                          (dict(width=8, leaf=2), "balance", dict(balance=0.5))])


def test_frontier_experiment_and_report(tmp_path, tiny_frontier):
    data, _ = write_idx_dir(tmp_path / "tiny", n_train=120, n_test=30, side=8, classes=4)
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["experiment", "frontier", "--datasets", str(data), "--seeds", "2", "--epochs", "2", "--runs", str(runs),
            "--results", str(results), "--latency-batch", "8", "--latency-repeats", "3", "--quiet"]
    assert main(argv) == 0
    root = runs / "frontier"
    meta = json.loads((root / "frontier.json").read_text())
    picked = meta["recipes"][str(data)]
    for family, entry in picked.items():                       # the recipe with the best validation accuracy
        assert set(entry["val"]) == {"sgd", "adam"} and entry["val"][entry["picked"]] == max(entry["val"].values())
    kept = {v["run"] for v in meta["variants"] if v["kept"]}
    for v in meta["variants"]:
        assert v["kept"] == (v["val"] > v["front_val"])
    # every grid configuration (and every kept variant) has all seeds; a dropped variant only its first
    for prefix in meta["grid"]:
        assert all((root / f"{prefix}_s{s}" / "metrics.json").exists() for s in (0, 1))
    for v in meta["variants"]:
        assert (v["run"] in meta["grid"]) == (v["run"] in kept)
        assert (root / f"{v['run']}_s1").exists() == (v["run"] in kept)
    cfg = json.loads((root / f"{meta['grid'][0]}_s0" / "config.json").read_text())
    assert cfg["train"]["epochs"] == 2
    for prefix in meta["grid"]:                                # each run trains the family its name says
        ffn = prefix.split("_")[2]
        assert json.loads((root / f"{prefix}_s0" / "config.json").read_text())["model"]["ffn"] == ffn
        assert json.loads((root / f"{prefix}_s0" / "metrics.json").read_text())["finished"] is True
    lat = meta["latency"][str(data)]
    assert set(lat["b1"]) == set(lat["bN"]) == {"1", "2"} and lat["batch"] == 8
    assert set(lat["b1"]["1"]) == set(meta["grid"]) and all(t > 0 for t in lat["bN"]["2"].values())
    md = (results / "frontier.md").read_text()
    assert md.splitlines()[2].startswith("Command: `fastff experiment frontier")
    assert "Target (at ≤ 16 neurons" in md and "vs dense ≤ batch 8, 2 threads (ms)" in md and "NeuronTree 2x1" in md and "NeuronTree 1x2" in md and "FFF w=8 l=2 (d2)" in md
    assert "Trees against the best dense FF no costlier than them: neurons per inference: " in md
    assert (results / "frontier_tiny.png").stat().st_size > 1000
    # the standalone report over the same directory writes the same tables
    assert main(["report", str(root), "--out", str(tmp_path / "r2"), "--name", "frontier"]) == 0
    assert (tmp_path / "r2" / "frontier.md").read_text().split("\n", 3)[3] == md.split("\n", 3)[3]


def test_frontier_target_and_pareto():
    assert report.pareto([(1, 80.0), (2, 79.0), (2, 85.0), (4, 85.0), (8, 90.0)]) == [0, 2, 4]
    row = lambda family, neurons, ga, val, b1: {"family": family, "neurons": neurons, "GA": [ga], "val": [val],
                                                "cost": {"neurons": neurons, "b1_1": b1}, "shape": f"{family} {neurons}"}
    rows = [row("fff", 15, 87.0, 88.0, 10.0), row("fff", 12, 88.0, 87.0, 9.0),   # best on val, not on test
            row("dense", 12, 85.5, 86.0, 9.9), row("dense", 16, 86.5, 87.0, 9.5), row("dense", 4, 80.0, 81.0, 8.0)]
    t = report.frontier_target(rows)
    assert t["tree"]["neurons"] == 15                                              # picked on validation
    assert [r["neurons"] for r in t["neurons"]["rivals"]] == [12, 4] and t["neurons"]["gap"] == pytest.approx(1.5)
    assert [r["neurons"] for r in t["b1_1"]["rivals"]] == [12, 16, 4] and not t["b1_1"]["met"]
    assert t["neurons"]["met"] and not t["either"]["met"] and t["either"]["gap"] == pytest.approx(0.5)
    # a tree is a family sized by depth; MoE rows are neither trees nor the dense baseline
    assert [report.tree_family(f) for f in ("fff", "neuron-tree", "moe", "dense")] == [True, True, False, False]
    moe = row("moe", 8, 99.0, 99.0, 1.0)
    assert report.frontier_target(rows + [moe])["tree"]["neurons"] == 15
    assert report.frontier_target([moe, rows[2]]) is None


def test_pca_routing_init_balances_leaves():
    torch.manual_seed(0)
    x = torch.randn(4096, 12) * torch.linspace(0.5, 3.0, 12)
    layer = FFF(12, 3, depth=3, leaf_width=2)
    pca_routing_init(layer, x)
    counts = torch.bincount(hard_path(x, layer.node_w, layer.node_b, 3).leaf, minlength=8)
    assert counts.min() >= 0.9 * 4096 / 8 and counts.max() <= 1.1 * 4096 / 8
    assert ((x @ layer.node_w[0]).std() - 1.0).abs() < 1e-3                       # logits of unit std at the root
    with pytest.raises(ValueError, match="routing_init"):
        TrainConfig(data="x", ffn="dense", routing_init="pca").validate()


def test_only_and_skip_select_runs():
    from argparse import Namespace
    todo = [(name, None) for name in ("fff_a_s0", "fff_a_s2", "dense_s2", "moe_s0")]
    pick = lambda only, skip: [n for n, _ in experiment._wanted(todo, Namespace(only=only, skip=skip))]
    assert pick(None, None) == ["fff_a_s0", "fff_a_s2", "dense_s2", "moe_s0"]
    assert pick("fff,dense", None) == ["fff_a_s0", "fff_a_s2", "dense_s2"]
    assert pick("fff,dense", "a_s2") == ["fff_a_s0", "dense_s2"] and pick(None, "_s2,moe") == ["fff_a_s0"]
