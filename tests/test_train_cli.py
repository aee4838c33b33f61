"""`fastff train` / `fastff report` / `fastff experiment` end to end on a tiny IDX dataset, the
checkpoint round trip (runs of the earlier flat format included), and the rule that the test
split is never used for selection."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastff
from fastff.apps.cli import main
from fastff.data import load_dataset
from fastff.io import saved_metadata
from fastff.layers.families import family
from fastff.training import trainer
from fastff.training.run import Interrupted, Schedule
from fastff.training.trainer import (TrainConfig, build_model, fit, hardening_weight, load_config, load_run,
                                     make_optimizer, schedule)

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
    ["--ffn", "fff", "--width", "8", "--leaf", "2", "--master-leaf", "token", "--balance", "0.5",
     "--region-leak", "0.1"],
    ["--model", "ff", "--width", "8"],                        # the flag and family names of earlier runs
    ["--ffn", "moe", "--width", "8", "--leaf", "2", "--top-k", "2", "--balance", "0.1"],
    ["--ffn", "neuron-tree", "--width", "7"],
    ["--ffn", "fff", "--width", "8", "--leaf", "2", "--train-mode", "hard_path", "--balance", "0.5"],
    ["--ffn", "fff", "--width", "8", "--leaf", "2", "--train-mode", "hard_path", "--optimizer", "local-adam",
     "--lr", "0.01", "--local-batch-size", "16"],
    ["--ffn", "dense", "--width", "8", "--optimizer", "local-sgd"],
    ["--ffn", "neuron-tree", "--width", "7", "--optimizer", "local-sgd", "--lr", "0.05"],
    ["--model", "fff", "--arch", "vit", "--width", "4", "--leaf", "1", "--patch", "4", "--vit-dim", "8",
     "--vit-layers", "1", "--vit-heads", "2", "--hardening-mode", "reach"],
])
def test_train_checkpoint_reload(idx_dir, tmp_path, opts):
    out = tmp_path / "run"
    assert main(["train", "--data", idx_dir, "--epochs", "3", "--seed", "1", "--quiet", "--out", str(out),
                 *opts]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "metrics.json"}
    assert not (out / "checkpoint.pt").exists()                 # a finished run keeps no checkpoint
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True
    assert len(metrics["history"]) == 3
    assert [e["epoch"] for e in metrics["history"]] == [1, 2, 3]
    for e in metrics["history"]:
        assert {"train_acc", "val_acc", "leaf_usage", "node_entropy", "train_loss", "lr", "hardening"} <= set(e)
    # selection is on validation: the earliest epoch with the best validation accuracy
    vals = [e["val_acc"] for e in metrics["history"]]
    assert metrics["best_epoch"] == vals.index(max(vals)) + 1
    assert metrics["test"]["rows"] == 30 and metrics["neurons_per_inference"] > 0
    if opts[1] in ("fff", "moe") and "vit" not in opts:
        usage = metrics["selected"]["leaf_usage"][0]
        top_k = int(opts[opts.index("--top-k") + 1]) if "--top-k" in opts else 1
        assert len(usage) == 4 and sum(usage) == 108 * top_k    # every probed train row lands in one leaf (top_k experts)
    # the reloaded checkpoint reproduces the recorded test accuracy exactly
    logits, data = _predictions(out, idx_dir)
    acc = 100.0 * (logits.argmax(-1) == data.test.y).sum().item() / len(data.test)
    assert acc == pytest.approx(metrics["test"]["acc"], abs=1e-9)


def test_reload_gives_identical_predictions(idx_dir, tmp_path):
    cfg = TrainConfig(data=idx_dir, ffn="fff", width=8, ffn_options=dict(leaf=2, master_leaf="scalar"), epochs=2)
    data = load_dataset(idx_dir, seed=cfg.seed)
    model, result = fit(cfg, data, tmp_path / "r", progress=False)
    reloaded, cfg2 = load_run(tmp_path / "r")
    assert cfg2.mean == data.mean and cfg2.std == data.std
    assert cfg2 == cfg and load_config(tmp_path / "r") == cfg
    assert cfg2.ffn_options["master_leaf"] == "scalar" and reloaded.layer.master is not None
    with torch.no_grad():
        assert torch.equal(model.eval()(data.test.x), reloaded(data.test.x))
        assert torch.equal(model(data.val.x), reloaded(data.val.x))


def test_test_split_evaluated_exactly_once(idx_dir, tmp_path, monkeypatch):
    data = load_dataset(idx_dir, seed=0)
    seen = []
    real = trainer.evaluate

    def spy(model, split, *a, **k):
        seen.append("test" if split is data.test else "val" if split is data.val else "train")
        return real(model, split, *a, **k)

    monkeypatch.setattr(trainer, "evaluate", spy)
    fit(TrainConfig(data=idx_dir, ffn="fff", width=8, ffn_options=dict(leaf=2), epochs=4), data, tmp_path / "r",
        progress=False)
    assert seen.count("test") == 1 and seen[-1] == "test"
    assert seen.count("val") == 4


def test_cannot_select_on_test(idx_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", idx_dir, "--select", "test", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'test'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="select must be one of 'val'"):
        TrainConfig(data=idx_dir, select="test").validate()
    assert not (tmp_path / "x").exists()


def test_early_stopping_uses_validation(idx_dir, tmp_path, monkeypatch):
    data = load_dataset(idx_dir, seed=0)
    accs = iter([50.0, 60.0, 55.0, 58.0, 90.0])                 # validation peaks at epoch 2
    real = trainer.evaluate

    def fake_val(model, split, *a, **k):
        out = real(model, split, *a, **k)
        if split is data.val:
            out["acc"] = next(accs)
        return out

    monkeypatch.setattr(trainer, "evaluate", fake_val)
    _, result = fit(TrainConfig(data=idx_dir, ffn="dense", width=8, epochs=5, patience=2), data, tmp_path / "r",
                    progress=False)
    assert result.best_epoch == 2 and len(result.epochs) == 4   # stopped after 2 epochs without improvement
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and len(metrics["history"]) == 4 and metrics["stopped"]


def test_recipe_options_stored_and_followed(idx_dir, tmp_path):
    """The tiny train split (108 rows) is one batch, so epoch e is optimiser step e-1."""
    out = tmp_path / "run"
    assert main(["train", "--data", idx_dir, "--ffn", "fff", "--width", "8", "--leaf", "2", "--epochs", "4",
                 "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.05", "--schedule", "cosine",
                 "--warmup", "1", "--hardening", "3", "--hardening-warmup", "2", "--quiet", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["version"], cfg["task"], cfg["model"]["ffn"], cfg["model"]["width"]) == (2, "classifier", "fff", 8)
    assert cfg["model"]["ffn_options"]["leaf"] == 2
    assert {k: cfg["train"][k] for k in ("optimizer", "lr", "weight_decay", "schedule", "warmup",
                                         "hardening_warmup")} == \
        dict(optimizer="adamw", lr=0.01, weight_decay=0.05, schedule="cosine", warmup=1, hardening_warmup=2)
    epochs = json.loads((out / "metrics.json").read_text())["history"]
    # warm-up step 0 at full lr (1 of 1 warm-up steps), then half a cosine over the 3 remaining steps
    assert [e["lr"] for e in epochs] == pytest.approx([0.01, 0.01, 0.0075, 0.0025])
    assert [e["hardening"] for e in epochs] == pytest.approx([0.0, 1.5, 3.0, 3.0])
    model, _ = load_run(out)
    assert model.layer.depth == 2


def test_paper_recipe_is_the_default():
    cfg = TrainConfig(data="x", ffn="fff").validate()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.schedule, cfg.warmup, cfg.hardening, cfg.hardening_mode,
            cfg.hardening_warmup, cfg.batch_size) == ("sgd", 0.2, 0.0, "none", 0, 3.0, "mean", 0, 256)
    assert schedule(cfg, 7) == Schedule(70, 0, "none")
    assert {schedule(cfg, 7)(s) for s in range(70)} == {1.0}
    assert {hardening_weight(cfg, s, 7) for s in range(70)} == {3.0}


def test_schedules():
    cfg = TrainConfig(data="x", epochs=10, warmup=2, schedule="step").validate()
    step = schedule(cfg, 5)
    assert step == Schedule(total=50, warmup=10, decay="step")
    # 2 warm-up epochs of 5 steps: lr rises linearly to the peak, then x0.1 at 50 % and 75 % of the 40 decay steps
    assert [step(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert [step(s) for s in (10, 29, 30, 39, 40, 49)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = schedule(TrainConfig(data="x", epochs=4, schedule="cosine").validate(), 1)
    assert [cosine(s) for s in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    ramp = TrainConfig(data="x", epochs=4, hardening=2.0, hardening_warmup=2).validate()
    assert [hardening_weight(ramp, s, 2) for s in range(6)] == pytest.approx([0, 0.5, 1, 1.5, 2, 2])


def test_optimizers():
    model = torch.nn.Linear(3, 2)
    sgd = make_optimizer(TrainConfig(data="x", momentum=0.9, weight_decay=1e-4), model)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    for name, kind in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = make_optimizer(TrainConfig(data="x", optimizer=name, lr=1e-3, weight_decay=0.01), model)
        assert type(opt) is kind and opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.01


def test_hardening_warmup_starts_from_zero(idx_dir, tmp_path):
    """A one-step run whose h ramp spans the whole run never applies hardening: its weights equal
    those of a run with h = 0, and differ from the same run with the full h."""
    data = load_dataset(idx_dir, seed=0)
    base = dict(data=idx_dir, ffn="fff", width=8, ffn_options=dict(leaf=2), epochs=1)

    def weights(**kw):
        model, _ = fit(TrainConfig(**base, **kw), data, tmp_path / str(len(list(tmp_path.iterdir()))), progress=False)
        return model.state_dict()

    ramped, off, full = weights(hardening=3.0, hardening_warmup=1), weights(hardening=0.0), weights(hardening=3.0)
    assert all(torch.equal(ramped[k], off[k]) for k in off)
    assert not torch.equal(ramped["layer.node_w"], full["layer.node_w"])


@pytest.mark.parametrize("opts, message", [
    (["--ffn", "fff", "--width", "12", "--leaf", "8"], "width must be leaf times a power of two"),
    (["--optimizer", "adam", "--momentum", "0.9"], "momentum applies to optimizer 'sgd' only"),
    (["--epochs", "3", "--warmup", "3"], "warmup must be in \\[0, 2\\]"),
    (["--epochs", "3", "--hardening-warmup", "4"], "hardening_warmup must be in \\[0, 3\\]"),
    (["--lr", "0"], "lr must be > 0"),
    (["--weight-decay", "-0.1"], "weight_decay must be in \\[0, inf\\]"),
    (["--ffn", "fff", "--region-leak", "0.7"], "region_leak' must be in \\[0.0, 0.5\\]"),
    (["--ffn", "moe", "--width", "8", "--leaf", "4", "--top-k", "3"], "top_k must be <= experts"),
    (["--ffn", "dense", "--width", "8", "--leaf", "2"], "--leaf do\\(es\\) not apply to --ffn dense"),
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
    assert md.count("| dense |") == 2 and md.count("| fff |") == 2 and "± " in md
    assert md.count("| tiny_ff_w") == 2 and md.count("| tiny_fff_w") == 2          # run names of earlier grids
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


def test_experiment_skips_finished_runs_and_resumes_interrupted_ones(idx_dir, tmp_path, monkeypatch):
    """An interrupted grid continues: the interrupted run from its checkpoint (to the weights of an
    uninterrupted run), the runs not started from scratch; finished runs are not trained again."""
    import os
    import signal

    argv = lambda runs: ["experiment", "table1", "--datasets", idx_dir, "--widths", "8", "--leaves", "2", "--seeds",
                         "1", "--epochs", "3", "--runs", str(runs), "--no-report", "--quiet"]
    whole, parts = tmp_path / "whole" / "table1", tmp_path / "parts" / "table1"
    names = ["tiny_ff_w8_s0", "tiny_fff_w8_l2_s0"]                  # in training order
    assert main(argv(whole.parent)) == 0
    loss = trainer._Task.loss

    def loss_and_signal(self, batch, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, batch, step)

    monkeypatch.setattr(trainer._Task, "loss", loss_and_signal)
    with pytest.raises(Interrupted, match="SIGINT at step 2/3"):
        main(argv(parts.parent))
    monkeypatch.undo()
    assert (parts / names[0] / "checkpoint.pt").exists() and not (parts / names[1]).exists()
    modes, real = [], trainer.fit

    def spy(cfg, data, out, mode="new", **kw):
        modes.append((out.name, mode))
        return real(cfg, data, out, mode, **kw)

    monkeypatch.setattr(trainer, "fit", spy)
    assert main(argv(parts.parent)) == 0
    assert modes == [(names[0], "resume"), (names[1], "overwrite")]
    for name in names:
        assert json.loads((parts / name / "metrics.json").read_text())["finished"] is True
        weights = [load_file(root / name / "model.safetensors") for root in (whole, parts)]
        assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        assert saved_metadata(whole / name / "model.safetensors") == saved_metadata(parts / name / "model.safetensors")
        records = [[{k: v for k, v in e.items() if k != "seconds"}
                    for e in json.loads((root / name / "metrics.json").read_text())["history"]] for root in (whole, parts)]
        assert records[0] == records[1] and len(records[0]) == 3
    modes.clear()
    assert main(argv(parts.parent)) == 0 and modes == []            # finished runs are skipped


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
    def flat(cfg):      # training fields and family options side by side
        values = asdict(cfg)
        return values | values.pop("ffn_options")

    for seed in range(3):
        plain = flat(runs[f"recipe_fff_s{seed}"])
        assert (plain["ffn"], plain["master_leaf"], plain["balance"], plain["leaf"]) == ("fff", "none", 0.0, 8)
        assert runs[f"recipe_ff_s{seed}"].ffn == runs[f"recipe_ff-momentum_s{seed}"].ffn == "dense"
        for variant, opts in experiments.RECIPE_VARIANTS.items():
            cfg = flat(runs[f"recipe_{variant}_s{seed}"])
            assert {k for k in cfg if cfg[k] != plain[k]} == set(opts)
    short = experiments.grid(parser.parse_args(["recipe", "--epochs", "2", "--seeds", "1"]))
    assert {cfg.epochs for _, cfg in short} == {2} and len(short) == len(runs) // 3
    assert {cfg.hardening_warmup for name, cfg in short if "ff-momentum" not in name} == {2}


# config.json of the earlier flat format, as `fastff train` wrote it before feedforward options had their own
# section (every per-kind field present, whether the kind used it or not)
OLD_FLAT_CONFIG = dict(
    model="fff", width=8, leaf=2, hardening=3.0, hardening_mode="mean", region_leak=0.0, balance=0.0,
    master_leaf="none", train_mode="soft", routing_init="none", activation="relu", top_k=1, trees=1, arch="mlp",
    vit_dim=64, vit_layers=2, vit_heads=4, patch=7, epochs=2, batch_size=256, lr=0.2, momentum=0.0, optimizer="sgd",
    weight_decay=0.0, local_batch_size=64.0, schedule="none", warmup=0, hardening_warmup=0, patience=0,
    select="val", seed=0, limit=None, val_fraction=0.1)


def write_old_run(out, data_dir, **changes):
    """A run directory of the earlier format: flat config.json, metrics.json with "epochs" and no
    "finished", and model.safetensors saved without config metadata. Returns (model, data)."""
    data = load_dataset(data_dir, seed=changes.get("seed", 0))
    flat = OLD_FLAT_CONFIG | dict(data=data_dir, n_features=data.n_features, n_classes=data.n_classes,
                                  image_shape=list(data.image_shape) if data.image_shape else None, mean=data.mean,
                                  std=data.std) | changes
    cfg = json.loads(json.dumps(trainer.upgrade_config(flat)))
    torch.manual_seed(123)
    model = build_model(trainer.config_from_sections(cfg)).eval()
    out.mkdir(parents=True)
    fastff.save(model, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(flat, indent=1))
    with torch.no_grad():
        acc = lambda split: 100.0 * (model(split.x).argmax(-1) == split.y).float().mean().item()
        usage = trainer.evaluate(model, data.train, stats=True)
    epochs = [{"epoch": e, "loss": 1.0, "train_acc": acc(data.train), "val_acc": acc(data.val),
               "leaf_usage": usage["leaf_usage"], "node_entropy": usage["node_entropy"], "lr": 0.2, "hardening": 3.0}
              for e in (1, 2)]
    (out / "metrics.json").write_text(json.dumps({
        "epochs": epochs, "best_epoch": 1,
        "selected": {"train_acc": acc(data.train), "val_acc": acc(data.val), "leaf_usage": usage["leaf_usage"],
                     "node_entropy": usage["node_entropy"]},
        "test": {"acc": acc(data.test), "eval_seconds": 0.001, "rows": len(data.test)},
        "neurons_per_inference": trainer.neurons_per_inference(model), "training_seconds": 1.0}, indent=1))
    return model, data


@pytest.mark.parametrize("changes, ffn, options", [
    ({}, "fff", dict(leaf=2, master_leaf="none", train_mode="soft", region_leak=0.0, activation="relu")),
    (dict(master_leaf="token", region_leak=0.1), "fff", dict(leaf=2, master_leaf="token", region_leak=0.1)),
    (dict(model="ff"), "dense", dict(activation="relu")),
    (dict(model="moe", leaf=4, top_k=2, activation="gelu"), "moe", dict(leaf=4, top_k=2, activation="gelu")),
    (dict(model="neuron-tree", width=6, trees=2), "neuron-tree", dict(trees=2)),
])
def test_old_flat_run_loads(idx_dir, tmp_path, changes, ffn, options):
    """A run directory of the earlier flat format (weights without config metadata) still loads:
    its config is converted (per-kind fields the family does not take dropped) and the weights
    reproduce the saved model."""
    out = tmp_path / "old"
    saved, data = write_old_run(out, idx_dir, **changes)
    assert "config_sha256" not in saved_metadata(out / "model.safetensors")
    model, cfg = load_run(out)
    assert cfg.ffn == ffn and {k: cfg.ffn_options[k] for k in options} == options
    assert set(cfg.ffn_options) == {o.name for o in family(ffn).options}
    assert (cfg.width, cfg.epochs, cfg.mean, cfg.std) == (changes.get("width", 8), 2, data.mean, data.std)
    assert load_config(out) == cfg
    with torch.no_grad():
        assert torch.equal(model(data.test.x), saved(data.test.x))
    # the directory is left as it was (converted when read, not rewritten)
    assert json.loads((out / "config.json").read_text())["model"] == changes.get("model", "fff")


def test_old_flat_run_reports_with_new_runs(idx_dir, tmp_path):
    """`fastff report` reads old-format runs next to new ones: an old run and a new run of the same
    configuration (another seed) are one row of two seeds."""
    runs = tmp_path / "runs"
    _, data = write_old_run(runs / "tiny_fff_w8_l2_s0", idx_dir)
    old_test = json.loads((runs / "tiny_fff_w8_l2_s0" / "metrics.json").read_text())["test"]["acc"]
    assert main(["train", "--data", idx_dir, "--ffn", "fff", "--width", "8", "--leaf", "2", "--epochs", "2",
                 "--seed", "1", "--quiet", "--out", str(runs / "tiny_fff_w8_l2_s1")]) == 0
    new_test = json.loads((runs / "tiny_fff_w8_l2_s1" / "metrics.json").read_text())["test"]["acc"]
    write_old_run(runs / "tiny_ff_w8_s0", idx_dir, model="ff")
    assert main(["report", str(runs), "--out", str(tmp_path / "r"), "--name", "mixed"]) == 0
    md = (tmp_path / "r" / "mixed.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| tiny_")]
    assert len(rows) == 2
    fff = next(r for r in rows if r.startswith("| tiny_fff_w8_l2 |")).split(" | ")
    assert fff[1:5] == [idx_dir, "fff", "8", "2"] and fff[5] == "2"            # data, ffn, width, leaf; 2 seeds
    assert f"{np.mean([old_test, new_test]):.2f} ± {np.std([old_test, new_test]):.2f}" in fff
    dense = next(r for r in rows if r.startswith("| tiny_ff_w8 |")).split(" | ")
    assert dense[1:6] == [idx_dir, "dense", "8", "-", "1"]                     # leaf: not a dense option
