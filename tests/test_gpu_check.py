"""benchmarks/gpu_check.py in its smoke mode (tiny sizes, Triton's interpreter on CPU), and the
timer's CUDA synchronisation."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastff.apps.timing import median_times

# not importorskip: importing triton here, before tests/test_kernels_triton.py turns its interpreter on,
# would make that module's kernels compiled ones
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is installed by `make test`")
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_every_timing_and_agreement(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--device", "cpu", "--threads", "1",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is True and result["errors"] == []
    assert result["meta"]["smoke"] is True and result["meta"]["device"] == "cpu"
    families = ("NeuronTree 1x3", "FFF d3 l2")
    expected = {"dense w15", "dense w16", *(f"{f} {b}" for f in families for b in ("torch", "triton", "triton rows",
                                                                                      "triton blocked"))}
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 8):
            rows = [r for r in result["eval"] if (r["dtype"], r["batch"]) == (dtype, batch)]
            assert {r["candidate"] for r in rows} == expected
    assert {r["candidate"] for r in result["train"]} == {"dense w15", "dense w16",
                                                         *(f"{f} {b}" for f in families for b in ("torch", "triton"))}
    for r in result["eval"] + result["train"]:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("ms", "first_call_ms", "dense_over_this"))
        assert r["baseline"] == ("dense w15" if "NeuronTree" in r["candidate"] or r["candidate"] == "dense w15"
                                 else "dense w16")
    assert len(result["agreement"]) == 2 * 2 * 2 * 2           # layers x paths x dtypes x batches
    for r in result["agreement"]:
        assert math.isfinite(r["max_abs_diff"]) and r["ok"] and r["rows_compared"] >= 1
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "## eval bfloat16" in text and "## train float32" in text
    assert text.rstrip().splitlines()[-1].startswith("ok: True")


def test_gpu_check_cpu_needs_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "set TRITON_INTERPRET=1" in done.stderr


def test_the_timer_synchronises_cuda_once_it_is_in_use(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    median_times({"a": lambda: None, "b": lambda: None}, 3, warmup=1)
    assert syncs == []                                    # CUDA not initialised: the clock as it is
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    median_times({"a": lambda: None, "b": lambda: None}, 3, warmup=1)
    assert len(syncs) == 2 * 3 * 2                        # before reading the clock at start and end of each call
