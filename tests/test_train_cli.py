"""`fastff train` / `fastff report` / `fastff experiment` end to end on a tiny IDX dataset, the
checkpoint round trip, and the rule that the test split is never used for selection."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from fastff.apps.cli import main
from fastff.data import load_dataset
from fastff.training import trainer
from fastff.training.trainer import (TrainConfig, fit, hardening_weight, load_run, lr_factor, make_optimizer,
                                     save_run)

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
    ["--model", "fff", "--width", "8", "--leaf", "2", "--train-mode", "hard_path", "--balance", "0.5"],
    ["--model", "fff", "--width", "8", "--leaf", "2", "--train-mode", "hard_path", "--optimizer", "local-adam",
     "--lr", "0.01", "--local-batch-size", "16"],
    ["--model", "dense", "--width", "8", "--optimizer", "local-sgd"],
    ["--model", "neuron-tree", "--width", "7", "--optimizer", "local-sgd", "--lr", "0.05"],
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


def test_recipe_options_stored_and_followed(idx_dir, tmp_path):
    """The tiny train split (108 rows) is one batch, so epoch e is optimiser step e-1."""
    out = tmp_path / "run"
    assert main(["train", "--data", idx_dir, "--model", "fff", "--width", "8", "--leaf", "2", "--epochs", "4",
                 "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.05", "--schedule", "cosine",
                 "--warmup", "1", "--hardening", "3", "--hardening-warmup", "2", "--quiet", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in ("optimizer", "lr", "weight_decay", "schedule", "warmup", "hardening_warmup")} == \
        dict(optimizer="adamw", lr=0.01, weight_decay=0.05, schedule="cosine", warmup=1, hardening_warmup=2)
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    # warm-up step 0 at full lr (1 of 1 warm-up steps), then half a cosine over the 3 remaining steps
    assert [e["lr"] for e in epochs] == pytest.approx([0.01, 0.01, 0.0075, 0.0025])
    assert [e["hardening"] for e in epochs] == pytest.approx([0.0, 1.5, 3.0, 3.0])
    model, _ = load_run(out)
    assert model.layer.depth == 2


def test_paper_recipe_is_the_default():
    cfg = TrainConfig(data="x", model="fff").validate()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.schedule, cfg.warmup, cfg.hardening, cfg.hardening_mode,
            cfg.hardening_warmup, cfg.batch_size) == ("sgd", 0.2, 0.0, "none", 0, 3.0, "mean", 0, 256)
    assert {lr_factor(cfg, s, 7) for s in range(70)} == {1.0}
    assert {hardening_weight(cfg, s, 7) for s in range(70)} == {3.0}


def test_schedules():
    cfg = TrainConfig(data="x", epochs=10, warmup=2, schedule="step").validate()
    # 2 warm-up epochs of 5 steps: lr rises linearly to the peak, then x0.1 at 50 % and 75 % of the 40 decay steps
    assert [lr_factor(cfg, s, 5) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert [lr_factor(cfg, s, 5) for s in (10, 29, 30, 39, 40, 49)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = TrainConfig(data="x", epochs=4, schedule="cosine").validate()
    assert [lr_factor(cosine, s, 1) for s in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    ramp = TrainConfig(data="x", epochs=4, hardening=2.0, hardening_warmup=2).validate()
    assert [hardening_weight(ramp, s, 2) for s in range(6)] == pytest.approx([0, 0.5, 1, 1.5, 2, 2])


def test_optimizers():
    model = torch.nn.Linear(3, 2)
    sgd = make_optimizer(TrainConfig(data="x", momentum=0.9, weight_decay=1e-4), model)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    for name, kind in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = make_optimizer(TrainConfig(data="x", optimizer=name, lr=1e-3, weight_decay=0.01), model)
        assert type(opt) is kind and opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.01


def test_hardening_warmup_starts_from_zero(idx_dir):
    """A one-step run whose h ramp spans the whole run never applies hardening: its weights equal
    those of a run with h = 0, and differ from the same run with the full h."""
    data = load_dataset(idx_dir, seed=0)
    base = dict(data=idx_dir, model="fff", width=8, leaf=2, epochs=1)

    def weights(**kw):
        model, _ = fit(TrainConfig(**base, **kw), data, progress=False)
        return model.state_dict()

    ramped, off, full = weights(hardening=3.0, hardening_warmup=1), weights(hardening=0.0), weights(hardening=3.0)
    assert all(torch.equal(ramped[k], off[k]) for k in off)
    assert not torch.equal(ramped["layer.node_w"], full["layer.node_w"])


@pytest.mark.parametrize("opts, message", [
    (["--model", "fff", "--width", "12", "--leaf", "8"], "width must be leaf \\* a power of two"),
    (["--optimizer", "adam", "--momentum", "0.9"], "momentum applies to optimizer 'sgd' only"),
    (["--epochs", "3", "--warmup", "3"], "warmup must be in \\[0, 2\\]"),
    (["--epochs", "3", "--hardening-warmup", "4"], "hardening_warmup must be in \\[0, 3\\]"),
    (["--lr", "0"], "lr must be > 0"),
    (["--weight-decay", "-0.1"], "weight_decay must be in \\[0, inf\\]"),
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


def test_recipe_grid_shares_one_recipe():
    """Every row of `fastff experiment recipe` but FF's own-recipe row uses RECIPE; an eFFF row
    differs from the plain FFF row of its seed exactly in its variant's options."""
    from dataclasses import asdict

    from fastff.apps import experiment as experiments

    parser = argparse.ArgumentParser()
    experiments.add_arguments(parser)
    runs = dict(experiments.grid(parser.parse_args(["recipe"])))
    assert len(runs) == 3 * (2 + len(experiments.RECIPE_VARIANTS))
    for name, cfg in runs.items():
        recipe = experiments.FF_RECIPE if "ff-momentum" in name else experiments.RECIPE
        assert {k: getattr(cfg, k) for k in recipe} == recipe
        assert (cfg.data, cfg.width, cfg.optimizer) == ("fashion-mnist", 128, "sgd")
    for seed in range(3):
        plain = asdict(runs[f"recipe_fff_s{seed}"])
        assert (plain["master_leaf"], plain["balance"], plain["leaf"]) == ("none", 0.0, 8)
        assert runs[f"recipe_ff_s{seed}"].model == runs[f"recipe_ff-momentum_s{seed}"].model == "ff"
        for variant, opts in experiments.RECIPE_VARIANTS.items():
            cfg = asdict(runs[f"recipe_{variant}_s{seed}"])
            assert {k for k in cfg if cfg[k] != plain[k]} == set(opts)
    short = experiments.grid(parser.parse_args(["recipe", "--epochs", "2", "--seeds", "1"]))
    assert {cfg.epochs for _, cfg in short} == {2} and len(short) == len(runs) // 3
    assert {cfg.hardening_warmup for name, cfg in short if "ff-momentum" not in name} == {2}
