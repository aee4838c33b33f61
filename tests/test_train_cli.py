"""`fastff train` / `fastff report` / `fastff experiment` end to end on a tiny IDX dataset, the
checkpoint round trip, and the rule that the test split is never used for selection."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastff.cli import main
from fastff.data import load_dataset
from fastff.training import trainer
from fastff.training.trainer import FFF_TRAIN_MODES, TrainConfig, fit, load_run, save_run

from test_data import write_idx_dir


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    root, _ = write_idx_dir(tmp_path_factory.mktemp("data") / "tiny", n_train=120, n_test=30, side=8, classes=4)
    return str(root)


def _predictions(run_dir, data_dir):
    model, cfg = load_run(run_dir)
    data = load_dataset(data_dir, seed=cfg.seed)
    with torch.no_grad():
        return model(data.test.x), data


@pytest.mark.parametrize("opts", [
    ["--model", "fff", "--width", "8", "--leaf", "2", "--master-leaf", "token", "--balance", "0.5",
     "--region-leak", "0.1"],
    ["--model", "ff", "--width", "8"],
    ["--model", "moe", "--width", "8", "--leaf", "2", "--top-k", "2", "--balance", "0.1"],
    ["--model", "neuron-tree", "--width", "7"],
    pytest.param(["--model", "fff", "--width", "8", "--leaf", "2", "--train-mode", "hard_path", "--balance", "0.5"],
                 marks=pytest.mark.skipif("hard_path" not in FFF_TRAIN_MODES,
                                          reason="this FFF has no train_mode='hard_path'")),
    ["--model", "fff", "--arch", "vit", "--width", "4", "--leaf", "1", "--patch", "4", "--vit-dim", "8",
     "--vit-layers", "1", "--vit-heads", "2", "--hardening-mode", "reach"],
])
def test_train_checkpoint_reload(idx_dir, tmp_path, opts):
    out = tmp_path / "run"
    assert main(["train", "--data", idx_dir, "--epochs", "3", "--seed", "1", "--quiet", "--out", str(out),
                 *opts]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3
    for e in metrics["epochs"]:
        assert {"train_acc", "val_acc", "leaf_usage", "node_entropy", "loss"} <= set(e)
    # selection is on validation: the earliest epoch with the best validation accuracy
    vals = [e["val_acc"] for e in metrics["epochs"]]
    assert metrics["best_epoch"] == vals.index(max(vals)) + 1
    assert metrics["test"]["rows"] == 30 and metrics["neurons_per_inference"] > 0
    if opts[1] in ("fff", "moe") and "vit" not in opts:
        usage = metrics["selected"]["leaf_usage"][0]
        assert len(usage) == 4 and sum(usage) == 108            # every probed train row lands in one leaf
    # the reloaded checkpoint reproduces the recorded test accuracy exactly
    logits, data = _predictions(out, idx_dir)
    acc = 100.0 * (logits.argmax(-1) == data.test.y).sum().item() / len(data.test)
    assert acc == pytest.approx(metrics["test"]["acc"], abs=1e-9)


def test_reload_gives_identical_predictions(idx_dir, tmp_path):
    cfg = TrainConfig(data=idx_dir, model="fff", width=8, leaf=2, epochs=2, master_leaf="scalar")
    data = load_dataset(idx_dir, seed=cfg.seed)
    model, result = fit(cfg, data, progress=False)
    save_run(tmp_path / "r", model, result)
    reloaded, cfg2 = load_run(tmp_path / "r")
    assert cfg2.mean == data.mean and cfg2.std == data.std
    with torch.no_grad():
        assert torch.equal(model.eval()(data.test.x), reloaded(data.test.x))
        assert torch.equal(model(data.val.x), reloaded(data.val.x))


def test_test_split_evaluated_exactly_once(idx_dir, monkeypatch):
    data = load_dataset(idx_dir, seed=0)
    seen = []
    real = trainer.evaluate

    def spy(model, split, *a, **k):
        seen.append("test" if split is data.test else "val" if split is data.val else "train")
        return real(model, split, *a, **k)

    monkeypatch.setattr(trainer, "evaluate", spy)
    fit(TrainConfig(data=idx_dir, model="fff", width=8, leaf=2, epochs=4), data, progress=False)
    assert seen.count("test") == 1 and seen[-1] == "test"
    assert seen.count("val") == 4


def test_cannot_select_on_test(idx_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", idx_dir, "--select", "test", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'test'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="select must be one of 'val'"):
        TrainConfig(data=idx_dir, select="test").validate()
    assert not (tmp_path / "x").exists()


def test_early_stopping_uses_validation(idx_dir, monkeypatch):
    data = load_dataset(idx_dir, seed=0)
    accs = iter([50.0, 60.0, 55.0, 58.0, 90.0])                 # validation peaks at epoch 2
    real = trainer.evaluate

    def fake_val(model, split, *a, **k):
        out = real(model, split, *a, **k)
        if split is data.val:
            out["acc"] = next(accs)
        return out

    monkeypatch.setattr(trainer, "evaluate", fake_val)
    _, result = fit(TrainConfig(data=idx_dir, model="ff", width=8, epochs=5, patience=2), data, progress=False)
    assert result.best_epoch == 2 and len(result.epochs) == 4   # stopped after 2 epochs without improvement


@pytest.mark.parametrize("opts, message", [
    (["--model", "fff", "--width", "12", "--leaf", "8"], "width must be leaf \\* a power of two"),
    (["--model", "fff", "--region-leak", "0.7"], "region_leak must be in \\[0, 0.5\\]"),
    (["--model", "moe", "--width", "8", "--leaf", "4", "--top-k", "3"], "top_k must be <= experts"),
    (["--epochs", "0"], "epochs must be >= 1"),
])
def test_bad_arguments(idx_dir, tmp_path, opts, message):
    with pytest.raises(ValueError, match=message):
        main(["train", "--data", idx_dir, "--quiet", "--out", str(tmp_path / "x"), *opts])


def test_experiment_and_report(idx_dir, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["experiment", "table1", "--datasets", idx_dir, "--widths", "4,8", "--leaves", "2", "--seeds", "2",
            "--epochs", "1", "--runs", str(runs), "--results", str(results), "--quiet"]
    assert main(argv) == 0
    assert len(list((runs / "table1").glob("*/metrics.json"))) == 8
    md = (results / "table1.md").read_text()
    assert md.splitlines()[2].startswith("Command: `fastff experiment table1")
    assert md.count("| ff |") == 2 and md.count("| fff |") == 2 and "± " in md
    for plot in ("acc_vs_neurons", "leaf_usage", "entropy"):
        assert (results / f"table1_{plot}.png").stat().st_size > 1000
    # --first-seed / --only train a slice of the grid (to split it over processes)
    assert main(argv[:8] + ["--seeds", "1", "--first-seed", "2", "--only", "fff_w4", "--no-report", *argv[10:]]) == 0
    assert sorted(p.parent.name for p in (runs / "table1").glob("*_s2/metrics.json")) == ["tiny_fff_w4_l2_s2"]
    # the standalone report over the same runs gives the same table
    for extra in (runs / "table1").glob("*_s2"):
        shutil.rmtree(extra)
    assert main(["report", str(runs / "table1"), "--out", str(tmp_path / "r2"), "--name", "t"]) == 0
    table = lambda text: text[text.index("### "):text.index("![")]
    assert table((tmp_path / "r2" / "t.md").read_text()) == table(md)
