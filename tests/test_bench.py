"""`fastff bench`: a tiny smoke run through the CLI, the writers and the hooks."""
import json
import sys
import types

import numba
import pytest
import torch

from fastff.apps import bench, cli


@pytest.fixture(autouse=True)
def restore_threads():
    """The CLI sets torch / numba thread counts; put them back for the other tests."""
    saved = torch.get_num_threads(), numba.get_num_threads()
    yield
    torch.set_num_threads(saved[0])
    numba.set_num_threads(saved[1])

SMOKE = ["bench", "--layer", "fff", "--dim", "16", "--depth", "2", "--leaf", "4", "--batch", "1,8",
         "--repeats", "1", "--warmup", "0", "--no-limits", "--threads", "1"]
FAMILY_FLAGS = {"fff": ["--leaf", "4"], "neuron-tree": ["--trees", "2"]}


def run_cli(argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr()


@pytest.mark.parametrize("layer", ["fff", "neuron-tree"])
def test_cli_json_smoke(layer, capsys):
    argv = [*SMOKE[:2], layer, *SMOKE[3:7], *FAMILY_FLAGS[layer], *SMOKE[9:], "--json"]
    out = run_cli(argv, capsys)
    rows = [json.loads(line) for line in out.out.splitlines()]
    backends = {"dense", "torch", "cpu", "cpu-kernel", "cpu-numba", "moe-top1", "moe-top2", "reference"}
    assert {(r["batch"], r["backend"]) for r in rows} == {(b, k) for b in (1, 8) for k in backends}
    for r in rows:
        assert set(bench.FIELDS) <= set(r)
        assert r["layer"] == layer and r["depth"] == 2 and r["ms"] > 0 and r["speedup_vs_dense"] > 0
    dense = [r for r in rows if r["backend"] == "dense"]
    assert all(r["speedup_vs_dense"] == 1.0 for r in dense)
    assert "[bench] batch 8" in out.err


def test_cli_csv_and_table(capsys):
    out = run_cli([*SMOKE, "--csv"], capsys).out.splitlines()
    assert out[0] == ",".join(bench.FIELDS) and len(out) == 1 + 2 * 8
    table = run_cli(SMOKE, capsys).out
    assert "speedup_vs_dense" in table and "cpu-kernel" in table


def test_reference_is_capped_to_small_batches():
    rows = bench.bench_rows(bench.Spec("neuron-tree", 1, dim=8), [2, 9], repeats=1, warmup=0,
                            include=("dense", "reference"), reference_max_batch=4)
    assert [(r["batch"], r["backend"]) for r in rows] == [(2, "dense"), (2, "reference"), (9, "dense")]


def test_work_per_row():
    # FFF depth 2, dim 4, leaf 3: 2 nodes x (4+1) + leaf 4x3+3 + 3x4+4 weights, x and y rows.
    assert bench.Spec("fff", 2, dim=4, options=dict(leaf=3)).work_per_row() == ((2 * 5 + 15 + 16 + 8) * 4,
                                                                                2 * 2 * 4 + 2 * 4 * 3 * 2)
    # NeuronTree 2 trees depth 1: 4 neurons of w_in row + bias + w_out row, b_out, x and y rows.
    assert bench.Spec("neuron-tree", 1, dim=4, options=dict(trees=2)).work_per_row() == ((4 * 9 + 4 + 8) * 4, 4 * 4 * 4)
    assert bench.Spec("neuron-tree", 11).training_width == 4095
    assert bench.Spec("fff", 8, options=dict(leaf=16)).training_width == 4096
    assert bench.Spec("fff", width=64, options=dict(leaf=4)).build().depth == 4           # sized by width
    # a family without a cost model has no roofline columns
    assert bench.Spec("moe", width=64).work_per_row() == (None, None)


def test_parse_batches_rejects_bad_lists():
    assert bench.parse_batches("1, 64,4096") == [1, 64, 4096]
    for bad in ("", "0,4", "a,b"):
        with pytest.raises(ValueError, match="--batch"):
            bench.parse_batches(bad)


def test_plot_sweep_writes_png(tmp_path, capsys):
    png = tmp_path / "d.png"
    run_cli([*SMOKE, "--plot", str(png), "--plot-depths", "1-2", "--plot-batch", "4"], capsys)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_and_onnx_hooks(monkeypatch, capsys):
    calls = []
    row = dict.fromkeys(bench.FIELDS, 1)

    def train_step_rows(dim, batch, quick):
        calls.append(("train", dim, batch, quick))
        return [dict(row, backend="train-hook")]

    def onnx_bench_rows(layer, batches):
        calls.append(("onnx", type(layer).__name__, batches))
        return [dict(row, backend="onnx-hook")]

    monkeypatch.setitem(sys.modules, "fastff.apps.train_bench", types.SimpleNamespace(train_step_rows=train_step_rows))
    monkeypatch.setitem(sys.modules, "fastff.apps.onnx_bench", types.SimpleNamespace(onnx_bench_rows=onnx_bench_rows))
    out = run_cli([*SMOKE, "--json", "--train", "--onnx", "--quick"], capsys).out
    backends = [json.loads(line)["backend"] for line in out.splitlines()]
    assert backends.count("train-hook") == 2 and backends.count("onnx-hook") == 1
    assert calls == [("train", 16, 1, True), ("train", 16, 8, True), ("onnx", "FFF", [1, 8])]


def test_machine_limits_and_percentages():
    lim = bench.machine_limits(seconds=0.2)
    assert lim["copy_gb_s"] > 0 and lim["gemm_gflop_s"] > 0
    rows = bench.add_limits([{"gb_s": 5.0, "gflop_s": 20.0}, {"gb_s": None, "gflop_s": None}],
                            {"copy_gb_s": 10.0, "gemm_gflop_s": 40.0})
    assert rows[0]["pct_copy_bw"] == 50.0 and rows[0]["pct_gemm"] == 50.0 and rows[1]["pct_gemm"] is None
