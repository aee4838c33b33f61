"""`fastff lm train|generate|bench|experiment` end to end on a few KB of text, and the training
loop's contract (schedule, selection on validation, one test evaluation)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastff.apps.cli import main
from fastff.data.text import split_text
from fastff.models.gpt import GPTConfig
from fastff.training import lm as L

TINY = ["--layers", "1", "--dim", "16", "--heads", "2", "--context", "16"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = "the king queen lord lady good my thou art love death night day heart crown time fair".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (7,), generator=gen).tolist()).capitalize() + "."
             for _ in range(400)]
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def run_dir(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "nt"
    assert main(["lm", "train", "--text", str(text_file), "--ffn", "neuron-tree", "--depth", "4", *TINY, "--steps", "30",
                 "--batch", "8", "--eval-every", "10", "--eval-batches", "2", "--lr", "3e-3", "--out", str(out),
                 "--quiet"]) == 0
    return out


def test_train_writes_a_run_that_reloads(run_dir, capsys):
    assert {p.name for p in run_dir.iterdir()} >= {"model.safetensors", "config.json", "metrics.json"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["step"] for e in metrics["history"]] == [10, 20, 30]
    best = min(metrics["history"], key=lambda e: e["val_loss"])
    assert metrics["best_step"] == best["step"] and metrics["val_loss"] == best["val_loss"]
    assert metrics["test_loss"] is not None and metrics["ffn_neurons_per_token"] == 5
    model, vocab, config = L.load_run(run_dir)
    assert not model.training and config["model"]["ffn"] == "neuron-tree" and len(vocab) == model.cfg.vocab_size


def test_generate_prints_text_and_speed(run_dir, capsys):
    assert main(["lm", "generate", str(run_dir), "--prompt", "The king", "--tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith("The king") and len(out["text"]) == len("The king") + 5 and out["tokens_per_s"] > 0
    assert main(["lm", "generate", str(run_dir), "--prompt", "The", "--tokens", "40", "--sliding"]) == 0
    capsys.readouterr()
    full = "The king and th."                          # exactly the context (16 characters) with --sliding
    assert main(["lm", "generate", str(run_dir), "--prompt", full, "--tokens", "5", "--json", "--sliding"]) == 0
    assert len(json.loads(capsys.readouterr().out)["text"]) == len(full) + 5


@pytest.mark.parametrize("prompt,tokens,message", [("", 5, "empty"), ("Zebra", 5, "not in the vocabulary"),
                                                   ("The king", 40, "exceed the model.s context of 16.*--sliding")])
def test_generate_bad_input(run_dir, prompt, tokens, message):
    with pytest.raises(ValueError, match=message):
        main(["lm", "generate", str(run_dir), "--prompt", prompt, "--tokens", str(tokens)])


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_bad_thread_counts_are_one_clear_error(run_dir, threads):
    with pytest.raises(ValueError, match=f"--threads must be >= 1, got {threads}"):
        main(["lm", "generate", str(run_dir), "--prompt", "The", "--tokens", "2", "--threads", threads])


def test_generate_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        main(["lm", "generate", str(tmp_path), "--prompt", "a"])


def test_bench_rows(capsys):
    args = ["lm", "bench", *TINY[:6], "--context", "24", "--depth", "3", "--prompt-tokens", "8", "--new-tokens", "2",
            "--repeats", "1", "--batches", "1,2", "--json", "--ffns", "dense,dense-int8,neuron-tree,neuron-tree-int8,no-ffn"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["phase"], r["batch"]) for r in rows} == {("prefill", 1), ("prefill", 2), ("generate", 1), ("generate", 2)}
    for r in rows:
        assert set(r) >= {"ffn", "phase", "batch", "tokens", "ms", "tokens_per_s", "speedup_vs_dense"}
        assert r["ms"] > 0 and r["tokens"] == r["batch"] * (8 if r["phase"] == "prefill" else 1)
    assert all(r["speedup_vs_dense"] == 1.0 for r in rows if r["ffn"] == "dense")
    assert main([*args[:-2], "--train", "--ffns", "dense,neuron-tree,no-ffn"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["phase"] for r in rows} == {"train"} and {r["ffn"] for r in rows} == {"dense", "neuron-tree", "no-ffn"}
    with pytest.raises(ValueError, match="--ffns"):
        main(["lm", "bench", "--ffns", "dense,conv"])


def test_bench_device_is_checked_before_any_model_is_built(monkeypatch):
    from fastff.apps import lm as app
    monkeypatch.setattr(app, "bench_models", lambda *a: pytest.fail("built models for a bad --device"))
    with pytest.raises(ValueError, match=r"--device must be cpu or cuda\[:N\], got 'tpu'"):
        main(["lm", "bench", "--device", "tpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available here"):
        main(["lm", "bench", "--device", "cuda", "--ffns", "dense"])


def test_experiment_grid_and_report(text_file, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert main(["lm", "experiment", "--text", str(text_file), *TINY, "--steps", "4", "--tune-steps", "2",
                 "--lrs", "1e-3,2e-3", "--seeds", "1", "--batch", "4", "--only", "dense,neuron-tree-1x11",
                 "--stages", "tune,steptime,steps,time", "--runs", str(runs), "--results", str(results),
                 "--quiet"]) == 0
    names = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert names == ["steps_dense_s0", "steps_neuron-tree-1x11_s0", "time_neuron-tree-1x11_s0",
                     "tune_dense_lr0.001_s0", "tune_dense_lr0.002_s0",
                     "tune_neuron-tree-1x11_lr0.001_s0", "tune_neuron-tree-1x11_lr0.002_s0"]
    records = json.loads((results / "lm.json").read_text())
    assert {"ffn", "seed", "val_loss", "test_loss", "train_seconds", "ms_per_step", "neurons_per_token",
            "training_width"} <= set(records[0])
    steptime = json.loads((runs / "steptime.json").read_text())["seconds"]
    time_run = next(r for r in records if r["run"] == "time_neuron-tree-1x11_s0")
    assert set(steptime) == {"dense", "neuron-tree-1x11", "no-ffn"}
    assert time_run["steps"] == max(1, round(4 * steptime["dense"] / steptime["neuron-tree-1x11"]))
    md = (results / "lm.md").read_text()
    assert "## Equal steps" in md and "## Equal wall-clock" in md and "feedforward vs the rest" in md
    assert all((results / f).stat().st_size > 0 for f in ("lm_val_vs_steps.png", "lm_val_vs_time.png",
                                                          "lm_loss_vs_neurons.png"))


def test_lr_schedule_and_config_checks():
    schedule = L.schedule(L.LMTrainConfig(steps=100, warmup=10, lr=1.0, min_lr_frac=0.1))
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(99) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="lr"):
        L.LMTrainConfig(lr=0).validate()
    with pytest.raises(ValueError, match="steps"):
        L.LMTrainConfig(steps=0).validate()


def test_fit_rejects_a_model_for_another_vocabulary(text_file, tmp_path):
    splits = split_text(text_file.read_text())
    with pytest.raises(ValueError, match="vocab_size"):
        L.fit(GPTConfig(vocab_size=len(splits.vocab) + 1, context=8, layers=1, heads=1, dim=8),
              L.LMTrainConfig(steps=1), splits, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()         # refused before the run directory was made


def test_experiment_lm_is_the_lm_experiment_command(capsys):
    """`fastff experiment lm` runs `fastff lm experiment` (same options)."""
    with pytest.raises(SystemExit) as exit_:
        main(["experiment", "lm", "--help"])
    assert exit_.value.code == 0 and "fastff lm experiment" in capsys.readouterr().out


@pytest.mark.parametrize("ffn", ["neuron-tree", "fff"])
def test_train_with_local_adam(text_file, tmp_path, ffn):
    """`--optimizer local-adam` trains a tree LM (validation loss falls) and records its recipe."""
    out = tmp_path / ffn
    shape = ["--depth", "3"] if ffn == "neuron-tree" else ["--width", "64", "--leaf", "8"]
    assert main(["lm", "train", "--text", str(text_file), "--ffn", ffn, *shape, *TINY, "--steps", "40",
                 "--batch", "8", "--eval-every", "20", "--eval-batches", "4", "--lr", "1e-2", "--warmup", "5",
                 "--optimizer", "local-adam", "--local-batch-size", "16", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    _, vocab, config = L.load_run(out)
    assert metrics["history"][-1]["val_loss"] < 0.9 * math.log(len(vocab))     # below uniform guessing
    assert config["train"]["optimizer"] == "local-adam" and config["train"]["weight_decay"] == 0.0
    assert config["model"]["usage_counters"] is True
    model, _, _ = L.load_run(out)
    assert model.ffns[0].usage == ("hard" if ffn == "neuron-tree" else "soft")


def test_bench_defaults_are_a_valid_gpt2_small_setting():
    """The default `fastff lm bench` shape fits its own prompt and decoded tokens (checked before timing)."""
    import argparse
    from fastff.apps import lm as app
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    args = parser.parse_args(["bench"])
    assert (args.layers, args.dim, args.heads, args.ffn_option_depth) == (12, 768, 12, 11)
    assert args.prompt_tokens == 512 and args.prompt_tokens + args.new_tokens <= args.context


def test_experiment_rejects_unknown_ablations(text_file, tmp_path):
    with pytest.raises(ValueError, match="--ablations: unknown wide"):
        main(["lm", "experiment", "--text", str(text_file), "--stages", "ablation", "--ablations", "16x5,wide",
              "--runs", str(tmp_path)])


def test_the_executable_reports_bad_input_in_one_line(monkeypatch, capsys):
    from fastff.apps import cli
    monkeypatch.setattr("sys.argv", ["fastff", "lm", "bench", "--ffns", "dense,conv"])
    assert cli.console() == 2
    err = capsys.readouterr().err
    assert err.startswith("fastff: error: --ffns must name some of") and "Traceback" not in err


def test_experiment_stage_names_are_checked_and_report_alone_writes_the_report(text_file, tmp_path):
    with pytest.raises(ValueError, match="--stages: unknown tunes"):
        main(["lm", "experiment", "--text", str(text_file), "--stages", "tunes", "--runs", str(tmp_path)])
    (tmp_path / "runs").mkdir()
    assert main(["lm", "experiment", "--text", str(text_file), "--stages", "report", "--runs", str(tmp_path / "runs"),
                 "--results", str(tmp_path / "out"), "--quiet"]) == 0
    assert "0 runs under" in (tmp_path / "out" / "lm.md").read_text()


def test_int8_baseline_quantizes_attention_and_dense_feedforwards_but_not_trees():
    from fastff import NeuronTree
    from fastff.models.gpt import GPT
    from fastff.models.quantize import quantize_int8
    int8 = lambda model: quantize_int8(model, feedforwards=True)      # what `lm bench` times as NAME-int8
    dense = int8(GPT(GPTConfig(vocab_size=11, context=8, layers=1, heads=2, dim=16, ffn="dense", ffn_width=32)).eval())
    tree = int8(GPT(GPTConfig(vocab_size=11, context=8, layers=1, heads=2, dim=16, ffn="neuron-tree",
                              ffn_options={"depth": 3})).eval())
    quantized = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(dense.blocks[0].attn.qkv, quantized) and isinstance(dense.blocks[0].ffn.fc1, quantized)
    assert isinstance(tree.blocks[0].attn.qkv, quantized) and isinstance(tree.blocks[0].ffn, NeuronTree)
    assert not any(isinstance(m, quantized) for m in tree.blocks[0].ffn.modules())
