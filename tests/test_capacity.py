"""Capacity diagnostics: units reached per level, dead units, routing balance and entropy, counted
on hand-built trees whose routes are known, and `fastff lm inspect` on a tiny run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastff import FFF, MoE, NeuronTree
from fastff.apps.cli import main
from fastff.training.capacity import MIN_ROWS_FOR_BALANCE, CapacityRecorder, worst


def scalar_tree(biases: list[float]) -> NeuronTree:
    """A one-input tree of depth 1 or 2 whose node n computes a = x + biases[n] (so x decides the routes)."""
    depth = {3: 1, 7: 2}[len(biases)]
    tree = NeuronTree(1, 2, depth).eval()
    with torch.no_grad():
        tree.w_in.fill_(1.0)
        tree.b_in.copy_(torch.tensor(biases).view(1, -1))
    return tree


def test_counts_on_a_tree_with_known_routes():
    # root a = x: right iff x >= 0; its left child (x + 5) and right child (x - 10) are leaves of depth 1
    tree = scalar_tree([0.0, 5.0, -10.0])
    x = torch.tensor([[-1.0], [-2.0], [-3.0], [3.0]])
    with CapacityRecorder(tree) as rec:
        tree(x)
    (s,) = rec.summary()
    assert s["family"] == "neuron-tree" and s["rows"] == 4
    assert [lv["size"] for lv in s["levels"]] == [1, 2]
    assert [lv["reached"] for lv in s["levels"]] == [1.0, 1.0] and s["deepest_reached"] == 1.0 and s["dead"] == 0.0
    assert s["root_right"] == 0.25 and s["levels"][0]["imbalance"] == pytest.approx(0.25)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s["levels"][1]["entropy"] == pytest.approx(entropy)
    assert s["levels"][1]["perplexity_frac"] == pytest.approx(math.exp(entropy) / 2)
    assert "imbalance" not in s["levels"][1]                       # the last level decides nothing below


def test_a_tree_that_sends_everything_left_has_dead_units():
    # every node's a = x - 100 < 0 for the inputs: all rows go left at every level
    tree = scalar_tree([-100.0] * 7)
    x = torch.randn(50, 1)
    with CapacityRecorder(tree) as rec:
        tree(x)
    (s,) = rec.summary()
    assert [lv["reached"] for lv in s["levels"]] == [1.0, 0.5, 0.25]
    assert s["dead"] == pytest.approx(4 / 7) and s["root_right"] == 0.0
    assert [lv["imbalance"] for lv in s["levels"][:2]] == [0.5, 0.5]
    assert worst([s, {**s, "deepest_reached": 0.5, "dead": 0.1}]) == {"deepest_reached_min": 0.25,
                                                                       "dead_max": pytest.approx(4 / 7)}


def test_balance_ignores_nodes_with_too_few_rows():
    tree = scalar_tree([0.0, 5.0, -10.0])
    x = torch.tensor([[-1.0], [2.0]] * (MIN_ROWS_FOR_BALANCE // 2 - 1) + [[-1.0]])
    with CapacityRecorder(tree) as rec:
        tree(x)
    assert rec.summary()[0]["levels"][0]["imbalance"] is None


def test_several_trees_are_numbered_tree_major():
    torch.manual_seed(0)
    tree = NeuronTree(6, 3, 3, trees=2).eval()
    x = torch.randn(300, 6)
    with CapacityRecorder(tree) as rec:
        tree(x)
    (s,) = rec.summary()
    assert [lv["size"] for lv in s["levels"]] == [2, 4, 8, 16]
    # recount the deepest level directly from the per-tree walks
    from fastff.functional import n_nodes, neuron_tree_walk
    nodes, _ = neuron_tree_walk(x, tree.w_in, tree.b_in, 3)
    deepest = {(k, n) for k in range(2) for n in (nodes[:, k, 3] - n_nodes(3)).tolist()}
    assert s["deepest_reached"] == len(deepest) / 16


def test_fff_and_moe_levels_and_training_forwards_are_not_counted():
    torch.manual_seed(1)
    fff, moe = FFF(5, 2, 3, 2), MoE(5, 2, 8, 2, 2)
    model = torch.nn.Sequential(fff, torch.nn.Linear(2, 5), moe)
    x = torch.randn(64, 5)
    with CapacityRecorder(model) as rec:
        model.train()(x)                                     # training forwards are not what is served
        assert rec.summary() == []
        model.eval()(x)
    f, m = rec.summary()
    assert (f["family"], m["family"]) == ("fff", "moe")
    assert [lv["size"] for lv in f["levels"]] == [1, 2, 4, 8] and [lv["size"] for lv in m["levels"]] == [8]
    assert f["rows"] == m["rows"] == 64
    experts = moe.router(model[1](fff(x))).topk(2, dim=-1).indices.unique()
    assert m["deepest_reached"] == len(experts) / 8
    # the hooks are gone after the block
    model(x)
    assert rec.summary()[0]["rows"] == 64


def test_lm_inspect_prints_and_plots(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the king and the queen of the land, my lord\n" * 80)
    run = tmp_path / "run"
    assert main(["lm", "train", "--text", str(text), "--ffn", "neuron-tree", "--depth", "3", "--layers", "2",
                 "--dim", "16", "--heads", "2", "--context", "16", "--steps", "6", "--batch", "4", "--eval-every",
                 "3", "--eval-batches", "2", "--capacity-tokens", "64", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["lm", "inspect", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["capacity"]) == 2 and all(c["rows"] == 64 and len(c["levels"]) == 4 for c in shown["capacity"])
    png = tmp_path / "cap.png"
    assert main(["lm", "inspect", str(run), "--step", "3", "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "step 3" in table and "neuron-tree" in table and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--step 4: .* diagnostics at steps \\[3, 6\\]"):
        main(["lm", "inspect", str(run), "--step", "4"])
