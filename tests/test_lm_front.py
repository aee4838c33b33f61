"""The long regime's front (validation loss vs batch-1 decoding speed of trained models, float and
int8) and its equal-wall-clock reading, on tiny runs of a tiny text (no corpus needed)."""
from __future__ import annotations

import argparse
import json

import pytest

from fastff.apps.lm_capacity import (CONTROL_STEPS, STEPS, _at_step, _control_lines, _equal_dense, _front_section,
                                     measure_front, pareto)
from fastff.apps.lm_grid import Grid
from fastff.data.text import split_text

TINY = {"dense-8": ("dense", dict(ffn="dense", ffn_width=8), {}),
        "nt-2x2": ("neuron-tree", dict(ffn="neuron-tree", ffn_width=14, ffn_options=dict(trees=2, depth=2)), {})}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    args = argparse.Namespace(runs=str(tmp_path_factory.mktemp("runs")), layers=1, dim=16, heads=2, context=16,
                              batch=4, quiet=True)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40
    g = Grid(args, split_text(text), TINY.__getitem__, evals=2)
    g.train("main_dense-8_s0", "dense-8", 4, 0, 1e-3)
    g.train("ablation_nt-2x2_s0", "nt-2x2", 4, 0, 1e-3)
    g.train("main_dense-8_s1", "dense-8", 4, 1, 1e-3)          # not seed 0: not on the front
    return g


def test_front_measures_every_seed0_model_float_and_int8(grid):
    front = json.loads(measure_front(grid).read_text())
    rows = {r["model"]: r for r in front["rows"]}
    assert set(rows) == {"dense-8", "dense-8 int8", "nt-2x2", "nt-2x2 int8"}
    assert rows["dense-8 int8"]["int8"] == "every linear layer" and rows["nt-2x2 int8"]["int8"] == "attention and head"
    assert rows["dense-8"]["int8"] is None and rows["nt-2x2"]["neurons_per_token"] == 6   # 2 trees x 3 levels
    for name, run in (("dense-8", "main_dense-8_s0"), ("nt-2x2", "ablation_nt-2x2_s0")):
        # the float model's loss measured again equals the one its run selected on the same windows
        metrics = json.loads((grid.root / run / "metrics.json").read_text())
        assert rows[name]["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert all(r["tokens_per_s"] > 0 and r["val_loss"] > 0 for r in rows.values())
    assert (front["prompt_tokens"], front["new_tokens"]) == (8, 8)     # clamped to the context of 16
    stamp = (grid.root / "front.json").stat().st_mtime_ns
    measure_front(grid)                                           # holds every model: kept
    assert (grid.root / "front.json").stat().st_mtime_ns == stamp


def test_front_refuses_a_root_without_weights(tmp_path):
    args = argparse.Namespace(runs=str(tmp_path), layers=1, dim=16, heads=2, context=16, batch=4, quiet=True)
    g = Grid(args, split_text("abc " * 300), TINY.__getitem__)
    with pytest.raises(FileNotFoundError, match="no trained seed-0 model"):
        measure_front(g)


def test_pareto_keeps_the_rows_nothing_beats_on_both_axes():
    rows = [{"model": "a", "val_loss": 1.5, "tokens_per_s": 100}, {"model": "b", "val_loss": 1.7, "tokens_per_s": 300},
            {"model": "c", "val_loss": 1.8, "tokens_per_s": 200},      # b is faster and better
            {"model": "d", "val_loss": 1.5, "tokens_per_s": 90},       # a ties on loss and is faster
            {"model": "e", "val_loss": 2.0, "tokens_per_s": 400}]
    assert pareto(rows) == {"a", "b", "e"}
    assert pareto(rows[:1]) == {"a"}


def test_front_section_names_the_trees_on_it(tmp_path):
    front = {"rows": [{"model": "dense-512", "variant": "dense-512", "val_loss": 1.55, "tokens_per_s": 500,
                       "neurons_per_token": 512},
                      {"model": "neuron-tree-2x9", "variant": "neuron-tree-2x9", "val_loss": 1.70, "tokens_per_s": 900,
                       "neurons_per_token": 20},
                      {"model": "dense-20", "variant": "dense-20", "val_loss": 1.72, "tokens_per_s": 800,
                       "neurons_per_token": 20}],
             "prompt_tokens": 64, "new_tokens": 32, "repeats": 7, "threads": 1, "load_average": 0.5}
    lines = _front_section(front, tmp_path / "front.png")
    assert "- Trees on the front: neuron-tree-2x9." in lines
    assert "| dense-20 | 20 | 1.720 | 800 |  |" in lines and (tmp_path / "front.png").stat().st_size > 0
    front["rows"][1].update(val_loss=1.80, tokens_per_s=700)     # now dense-20 beats it on both
    assert "- Trees on the front: none (target missed)." in _front_section(front, tmp_path / "front.png")


def test_at_step_interpolates_the_history():
    history = [{"step": 0, "val_loss": 4.0}, {"step": 100, "val_loss": 2.0}, {"step": 200, "val_loss": 1.0}]
    assert _at_step(history, 50) == 3.0 and _at_step(history, 150) == 1.5
    assert _at_step(history, 1000) == 1.0 and _at_step(history, -5) == 4.0


def test_control_lines_judge_the_longer_runs_against_the_main_rows_seed_noise(monkeypatch):
    main = [{"variant": v, "val_loss": loss, "seed": i} for v, losses in
            (("moe-16x32", (1.70, 1.69, 1.71)), ("dense-48", (1.67, 1.65, 1.69))) for i, loss in enumerate(losses)]
    control = [{"variant": "moe-16x32", "val_loss": 1.60, "neurons_per_token": 48},
               {"variant": "dense-48", "val_loss": 1.62, "neurons_per_token": 48}]
    lines = _control_lines(control, main)
    assert f"- moe-16x32: 1.600 after {CONTROL_STEPS} steps (1 seed(s)), 1.700 after {STEPS} (3 seed(s)): -0.100." in lines
    assert lines[-1].endswith("+0.020 nats for MoE (1 seed(s); per seed +0.020; seed std at 5000 steps 0.020: "
                              "still NOT capacity-bound by this control).")
    control[0]["val_loss"] = 1.55
    assert _control_lines(control, main)[-1].endswith("(1 seed(s); per seed +0.070; seed std at 5000 steps 0.020: "
                                                      "capacity-bound).")
    control += [{"variant": "nt-2x9-gate-node-balance", "val_loss": 1.545, "neurons_per_token": 20},
                {"variant": "dense-512", "val_loss": 1.5, "neurons_per_token": 512,
                 "history": [{"step": 0, "val_loss": 4.0}, {"step": CONTROL_STEPS, "val_loss": 1.5}]},
                {"variant": "dense-20", "val_loss": 1.6, "neurons_per_token": 20}]
    assert _control_lines(control, main)[-2:] == [
        f"- nt-2x9-gate-node-balance vs dense-20 after {CONTROL_STEPS} steps: +0.055 nats for the tree (target >= "
        "+0.05: met so far, 1 of 3 seeds).",
        f"- nt-2x9-gate-node-balance vs dense-512 after {CONTROL_STEPS} steps: 1.030x (target <= 1.03x at equal "
        "tokens: met so far, 1 of 3 seeds)."]
    # its dense rival at another lr is judged too
    import fastff.apps.lm_capacity as capacity
    monkeypatch.setitem(capacity.VARIANTS, "dense-20-lr2e-3", capacity.VARIANTS["dense-20"][:2] + (dict(lr=2e-3),))
    with_lr = control + [{"variant": "dense-20-lr2e-3", "val_loss": 1.58, "neurons_per_token": 20}]
    assert (f"- nt-2x9-gate-node-balance vs dense-20-lr2e-3 after {CONTROL_STEPS} steps: +0.035 nats for the tree "
            "(target >= +0.05: missed so far, 1 of 3 seeds).") in _control_lines(with_lr, main)
    # the tree steps twice as fast: dense-512 trains half the steps in its time, at 2.75 on that history
    assert _control_lines(control, main, {"nt-2x9-gate-node-balance": 0.1, "dense-512": 0.2})[-1] == (
        f"- ... at equal training time: dense-512 trains {CONTROL_STEPS // 2} steps in the tree's {CONTROL_STEPS}, its "
        f"validation loss there (within its own {CONTROL_STEPS}-step schedule) 2.750: 0.562x (target <= 1.03x: "
        "met so far, 1 of 3 seeds).")


def test_control_lines_use_the_controls_own_seed_noise_and_means():
    main = [{"variant": v, "val_loss": 1.7, "seed": i} for v in ("moe-16x32", "dense-48") for i in range(3)]
    control = [{"variant": v, "val_loss": loss, "neurons_per_token": 48, "seed": i}
               for v, losses in (("moe-16x32", (1.53, 1.55)), ("dense-48", (1.60, 1.64))) for i, loss in enumerate(losses)]
    lines = _control_lines(control, main)
    assert f"- moe-16x32: 1.540 ± 0.014 after {CONTROL_STEPS} steps (2 seed(s)), 1.700 after {STEPS} (3 seed(s)): " \
           "-0.160." in lines
    assert lines[-1] == (f"- Control after {CONTROL_STEPS} steps: moe-16x32 1.540 vs dense-48 1.620: +0.080 nats "
                         f"for MoE (2 seed(s); per seed +0.070 / +0.090; seed std at {CONTROL_STEPS} steps 0.028: "
                         "capacity-bound).")


def test_control_lines_hold_every_moe_against_dense_48_at_every_lr_tried():
    main = [{"variant": v, "val_loss": 1.7, "seed": i} for v in ("moe-16x32", "dense-48") for i in range(3)]
    control = [{"variant": v, "val_loss": loss, "neurons_per_token": 48, "seed": i}
               for v, losses in (("moe-16x32", (1.60, 1.50)), ("dense-48", (1.60, 1.60)),
                                 ("moe-16x32-lr2e-3", (1.50, 1.52)), ("dense-48-lr2e-3", (1.56, 1.58)))
               for i, loss in enumerate(losses)]
    lines = [line for line in _control_lines(control, main) if line.startswith("- Control")]
    assert [line.split(": ")[1] for line in lines] == [
        "moe-16x32 1.550 vs dense-48 1.600", "moe-16x32 1.550 vs dense-48-lr2e-3 1.570",
        "moe-16x32-lr2e-3 1.510 vs dense-48 1.600", "moe-16x32-lr2e-3 1.510 vs dense-48-lr2e-3 1.570"]
    assert "per seed +0.000 / +0.100; seed std at 15000 steps 0.071: still NOT capacity-bound" in lines[0]
    assert "per seed +0.060 / +0.060; seed std at 15000 steps 0.014: capacity-bound" in lines[3]
    # a single seed of an MoE and of dense-48 at another lr only: the main rows' dense-48 noise
    lines = _control_lines([r for r in control if r["variant"] in ("moe-16x32-lr2e-3", "dense-48-lr2e-3")
                            and r["seed"] == 0], main)
    assert lines[-1].endswith("+0.060 nats for MoE (1 seed(s); per seed +0.060; seed std at 5000 steps 0.000: "
                              "capacity-bound).")


def test_a_tree_is_measured_against_the_narrowest_dense_ffn_with_at_least_its_neurons():
    rows = [{"variant": "nt-3x9-gate-node-balance", "neurons_per_token": 30},
            {"variant": "dense-20", "neurons_per_token": 20},
            {"variant": "dense-32", "neurons_per_token": 32}, {"variant": "dense-48", "neurons_per_token": 48},
            {"variant": "dense-512", "neurons_per_token": 512}]
    assert _equal_dense(rows, "nt-3x9-gate-node-balance") == "dense-32"
    assert _equal_dense(rows, "dense-20") == "dense-20"
    assert _equal_dense(rows[:2], "nt-3x9-gate-node-balance") is None
    # a dense FFN trained at another lr is not a width of its own
    rows[2] = {"variant": "dense-32-lr2e-3", "neurons_per_token": 32}
    assert _equal_dense(rows, "nt-3x9-gate-node-balance") == "dense-48"


def test_verdicts_hold_the_tree_picked_on_the_first_corpus_against_the_dense_ffn_of_at_least_its_neurons():
    from fastff.apps.lm_capacity import _best_tree, _verdicts

    def rows(variant, n, losses):
        return [{"variant": variant, "neurons_per_token": n, "val_loss": loss, "seed": i, "capacity": None,
                 "history": []} for i, loss in enumerate(losses)]

    main = (rows("nt-3x9-gate-node-balance", 30, (1.60, 1.58, 1.59)) + rows("dense-32", 32, (1.70, 1.66, 1.68))
            + rows("dense-512", 512, (1.55, 1.56, 1.57)))
    # a second corpus where another tree happens to be lower: the first corpus's pick is still the one judged
    other = main + rows("nt-2x9-gate-node-balance", 20, (1.50, 1.50, 1.50))
    assert _best_tree(main) == "nt-3x9-gate-node-balance" and _best_tree(other) == "nt-2x9-gate-node-balance"
    assert _best_tree(rows("dense-32", 32, (1.7,))) is None
    for corpus_rows in (main, other):
        lines = _verdicts(corpus_rows, "shakespeare", None, _best_tree(main))
        assert lines[0] == ("- Best tree at <= 1/16 of the dense neurons (picked on the first corpus): "
                            "nt-3x9-gate-node-balance (shakespeare, 30 neurons/token, 3 seed(s)) 1.590 vs dense-32 1.680 "
                            "(3 seed(s)): +0.090 nats (target >= +0.05 over 3 seeds: met).")
        assert lines[1] == ("- nt-3x9-gate-node-balance vs dense-512 at equal tokens (shakespeare): 1.019x (target <= "
                            "1.03x: met).")
    assert _verdicts(rows("dense-32", 32, (1.7,)), "fortunes", None, "nt-3x9-gate-node-balance") == []


def test_the_full_dense_ffn_is_no_trees_rival_of_equal_neurons():
    rows = [{"variant": "nt-3x9-gate-node-balance", "neurons_per_token": 30},
            {"variant": "dense-512", "neurons_per_token": 512}]
    assert _equal_dense(rows, "nt-3x9-gate-node-balance") is None
