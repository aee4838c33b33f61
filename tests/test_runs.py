"""The run core: run directories that are never lost (checkpoint, resume to the same weights,
signals, refusal to overwrite, locking, config/weights consistency) under both trainers."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import fastff
from fastff.apps.cli import main
from fastff.data import Dataset, Split
from fastff.data.text import split_text
from fastff.models.gpt import GPTConfig
from fastff.training import lm as L
from fastff.training import trainer as T
from fastff.training.run import Interrupted, RunDir, Schedule, config_digest


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-for-bit comparisons on one thread (parallel reductions may reorder sums)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def splits():
    gen = torch.Generator().manual_seed(0)
    words = "the king queen lord lady good my thou art love".split()
    text = "\n".join(" ".join(words[i] for i in torch.randint(len(words), (6,), generator=gen).tolist())
                     for _ in range(300))
    return split_text(text)


def lm_configs(splits, ffn="neuron-tree", options=None, width=31, **train):
    model = GPTConfig(vocab_size=len(splits.vocab), context=16, layers=1, heads=2, dim=16, ffn=ffn, ffn_width=width,
                      ffn_options=options or {})
    return model, L.LMTrainConfig(**(dict(steps=24, batch_size=4, eval_every=6, eval_batches=2, warmup=4) | train))


def interrupt_at(monkeypatch, task_cls, step: int):
    """Deliver SIGINT to this process during training step ``step`` (0-based)."""
    loss = task_cls.loss

    def loss_and_signal(self, batch, s):
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, batch, s)

    monkeypatch.setattr(task_cls, "loss", loss_and_signal)


def same_weights(a, b) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def history(run_dir):
    """Evaluation records without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((run_dir / "metrics.json").read_text())["history"]]


@pytest.mark.parametrize("ffn,options,train", [("neuron-tree", {}, {}),
                                               ("fff", {"leaf": 4, "region_leak": 0.2}, {"balance": 0.01}),
                                               ("neuron-tree", {}, {"optimizer": "local-adam", "weight_decay": 0.0})],
                         ids=["neuron-tree", "fff-region-leak", "local-adam"])
def test_lm_resume_gives_the_weights_of_an_uninterrupted_run(splits, tmp_path, monkeypatch, ffn, options, train):
    model_cfg, cfg = lm_configs(splits, ffn, options, width=32 if ffn == "fff" else 31, **train)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _, uninterrupted = L.fit(model_cfg, cfg, splits, whole, progress=False)
    interrupt_at(monkeypatch, L._Task, 9)                            # mid-way between evaluations 6 and 12
    with pytest.raises(Interrupted, match="SIGINT at step 10/24.*--resume"):
        L.fit(model_cfg, cfg, splits, parts, progress=False)
    assert (parts / "checkpoint.pt").exists() and not json.loads((parts / "metrics.json").read_text())["finished"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unfinished run.*--resume"):
        L.fit(model_cfg, cfg, splits, parts, progress=False)
    # a config written before an option existed (here: without ``capacity_tokens`` and the
    # family's ``activation``) resumes: configs are compared with the current defaults filled in
    saved = json.loads((parts / "config.json").read_text())
    del saved["train"]["capacity_tokens"], saved["model"]["ffn_options"]["activation"]
    (parts / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="differs from the run being resumed"):
        L.fit(model_cfg, L.LMTrainConfig(**{**vars(cfg), "lr": 2 * cfg.lr}), splits, parts, mode="resume",
              progress=False)
    _, resumed = L.fit(model_cfg, cfg, splits, parts, mode="resume", progress=False)
    same_weights(whole, parts)
    assert history(whole) == history(parts) and len(history(parts)) == 4
    assert resumed.test_loss == uninterrupted.test_loss and not (parts / "checkpoint.pt").exists()


def tiny_dataset(n=120, features=6, classes=3) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    split = lambda lo, hi: Split(x[lo:hi], y[lo:hi])
    return Dataset("tiny", split(0, 80), split(80, 100), split(100, 120), classes, None, 0.0, 1.0)


@pytest.mark.parametrize("optimizer", ["sgd", "local-adam"])
def test_classifier_resume_mid_epoch_gives_the_same_weights(tmp_path, monkeypatch, optimizer):
    cfg = lambda: T.TrainConfig(data="tiny", ffn="fff", width=16, ffn_options={"leaf": 4, "region_leak": 0.1},
                                epochs=4, batch_size=16, optimizer=optimizer, lr=0.05, schedule="cosine", warmup=1,
                                hardening_warmup=2, balance=0.1)
    data = tiny_dataset()
    T.fit(cfg(), data, tmp_path / "whole", progress=False)
    interrupt_at(monkeypatch, T._Task, 7)                            # epoch 2 of 4, batch 3 of 5
    with pytest.raises(Interrupted, match="SIGINT at step 8/20"):
        T.fit(cfg(), data, tmp_path / "parts", progress=False)
    monkeypatch.undo()
    T.fit(cfg(), data, tmp_path / "parts", mode="resume", progress=False)
    same_weights(tmp_path / "whole", tmp_path / "parts")
    assert history(tmp_path / "whole") == history(tmp_path / "parts")


def test_sigterm_writes_a_checkpoint_and_the_cli_says_how_to_resume(splits, tmp_path, monkeypatch, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(splits.vocab.decode(splits.train[:3000])))
    interrupt_at(monkeypatch, L._Task, 3)
    monkeypatch.setattr(os, "kill", lambda pid, sig, kill=os.kill: kill(pid, signal.SIGTERM))
    args = ["fastff", "lm", "train", "--text", str(text), "--layers", "1", "--dim", "16", "--heads", "2",
            "--context", "16", "--steps", "10", "--batch", "4", "--eval-every", "5", "--eval-batches", "2",
            "--out", str(tmp_path / "run"), "--quiet"]
    monkeypatch.setattr("sys.argv", args)
    from fastff.apps import cli
    assert cli.console() == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGTERM at step 4/10" in err[0] and "--resume" in err[0]
    monkeypatch.undo()
    assert main(args[1:] + ["--resume"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["finished"] is True


def test_run_directory_rules(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        RunDir(afile)
    with RunDir(tmp_path / "run") as run:
        with pytest.raises(ValueError, match="another process is writing the run"):
            RunDir(tmp_path / "run")
        run.write_config({"version": 2, "task": "lm", "model": {}, "train": {}, "data": {}})
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        RunDir(tmp_path / "run", "resume")
    with pytest.raises(ValueError, match="unfinished run"):
        RunDir(tmp_path / "run")
    RunDir(tmp_path / "run", "overwrite").close()
    assert not (tmp_path / "run" / "config.json").exists()


def test_non_finite_loss_keeps_the_best_model(splits, tmp_path, monkeypatch):
    model_cfg, cfg = lm_configs(splits)
    loss = L._Task.loss

    def nan_from_step_8(self, batch, step):
        total, pred = loss(self, batch, step)
        return (total * float("nan"), float("nan")) if step >= 8 else (total, pred)

    monkeypatch.setattr(L._Task, "loss", nan_from_step_8)
    _, run = L.fit(model_cfg, cfg, splits, tmp_path / "run", progress=False)
    assert run.stopped == "training loss became nan at step 9" and run.best_step == 6
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["finished"] is True


def test_edited_config_is_refused(splits, tmp_path):
    model_cfg, cfg = lm_configs(splits, steps=6)
    L.fit(model_cfg, cfg, splits, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "config.json"
    original = json.loads(path.read_text())
    vocab = original["data"]["vocab"]
    for edited in (vocab[1:] + vocab[0], vocab[:-1], vocab + "\u00e9"):
        path.write_text(json.dumps(original | {"data": original["data"] | {"vocab": edited}}))
        with pytest.raises(ValueError, match="config.json"):
            L.load_run(tmp_path / "run")
        with pytest.raises(ValueError, match="config.json"):
            main(["lm", "generate", str(tmp_path / "run"), "--prompt", vocab[:2], "--tokens", "2"])
    path.write_text(json.dumps(original))
    assert L.load_run(tmp_path / "run")[0] is not None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config_sha256"] == config_digest(original)


def test_config_errors_name_the_file(splits, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{run}/config.json is not valid JSON"):
        L.load_run(run)
    (run / "config.json").write_text(json.dumps({"train": {}, "vocab": "ab"}))
    with pytest.raises(ValueError, match="no 'model' section"):
        L.load_run(run)
    model_cfg, cfg = lm_configs(splits, steps=2, eval_every=1)
    classifier = tmp_path / "classifier"
    T.fit(T.TrainConfig(data="tiny", ffn="dense", width=4, epochs=1), tiny_dataset(), classifier, progress=False)
    with pytest.raises(ValueError, match="is a 'classifier' run, not a 'lm' run"):
        main(["lm", "generate", str(classifier), "--prompt", "a"])


def test_runs_of_the_earlier_format_still_load(tmp_path):
    """A run directory written before the run core (flat config, no config checksum) loads."""
    old = tmp_path / "old"
    old.mkdir()
    cfg = dict(data="tiny", model="fff", width=16, leaf=4, hardening=3.0, hardening_mode="mean", region_leak=0.0,
               balance=0.0, master_leaf="scalar", train_mode="soft", routing_init="none", activation="relu", top_k=1,
               trees=1, arch="mlp", vit_dim=64, vit_layers=2, vit_heads=4, patch=7, epochs=1, batch_size=16, lr=0.2,
               momentum=0.0, optimizer="sgd", weight_decay=0.0, local_batch_size=64.0, schedule="none", warmup=0,
               hardening_warmup=0, patience=0, select="val", seed=0, limit=None, val_fraction=0.1, n_features=6,
               n_classes=3, image_shape=None, mean=0.0, std=1.0)
    (old / "config.json").write_text(json.dumps(cfg))
    layer = fastff.FFF(6, 3, 2, 4, master_leaf="scalar")
    model = T.FlatClassifier.__new__(T.FlatClassifier)
    torch.nn.Module.__init__(model)
    model.layer = layer
    fastff.save(model, old / "model.safetensors")
    loaded, tc = T.load_run(old)
    assert tc.ffn == "fff" and tc.ffn_options["master_leaf"] == "scalar" and tc.ffn_options["leaf"] == 4
    x = torch.randn(5, 6)
    assert torch.equal(loaded(x), model.eval()(x))


def test_one_schedule():
    s = Schedule(total=100, warmup=10, decay="cosine", floor=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == 1.0 and s(99) == pytest.approx(0.1, abs=1e-3)
    step = Schedule(total=40, decay="step")
    assert [step(i) for i in (0, 19, 20, 30)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]
    assert Schedule(total=5)(3) == 1.0


def test_a_family_gaining_an_option_keeps_finished_runs_loadable(splits, tmp_path, monkeypatch):
    """A finished run records the digest of config.json as written: an option added to the family
    later (filled in with its default when the config is read) does not make its weights foreign."""
    import dataclasses
    from fastff.layers import families as F

    model_cfg, cfg = lm_configs(splits, steps=4, eval_every=2)
    L.fit(model_cfg, cfg, splits, tmp_path / "run", progress=False)
    tree = F.FAMILIES["neuron-tree"]
    newer = dataclasses.replace(tree, options=(*tree.options, F.Option("later_option", int, 0, "added later")),
                                make=lambda i, o, w, opts, **rt: tree.make(i, o, w, {k: v for k, v in opts.items()
                                                                                     if k != "later_option"}, **rt))
    monkeypatch.setitem(F.FAMILIES, "neuron-tree", newer)
    model, _, config = L.load_run(tmp_path / "run")
    assert "later_option" not in config["model"]["ffn_options"] and model is not None


def test_a_grid_process_waits_for_a_run_another_process_is_training(splits, tmp_path, monkeypatch):
    """Grid processes sharing a root do not crash on each other's runs: a locked run is waited
    for, then read back once the other process has finished it."""
    import argparse
    from fastff.apps import lm_grid

    args = argparse.Namespace(runs=str(tmp_path / "grid"), layers=1, dim=16, heads=2, context=16, batch=4, quiet=True)
    grid = lm_grid.Grid(args, splits, lambda name: ("dense", dict(ffn="dense", ffn_width=8), {}))
    holder = RunDir(tmp_path / "grid" / "r_s0", "new")                    # the other process
    waits = []

    def other_process_finishes(seconds):
        waits.append(seconds)
        (tmp_path / "grid" / "r_s0" / "metrics.json").write_text(json.dumps({"finished": True, "val_loss": 1.5}))
        holder.close()

    monkeypatch.setattr(lm_grid.time, "sleep", other_process_finishes)
    assert grid.train("r_s0", "dense-8", 4, 0, 1e-3)["val_loss"] == 1.5
    assert waits == [lm_grid.LOCK_POLL_SECONDS]
