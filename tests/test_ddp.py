"""DistributedDataParallel (gloo, 2 processes under torchrun) equals one process on the same
global batch; aux records and usage counters are reduced across ranks."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import fastff

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_train.py"


def _torchrun(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _example():
    spec = importlib.util.spec_from_file_location("ddp_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_two_processes_match_one_process(tmp_path):
    steps, batch = 4, 64
    out = _torchrun(EXAMPLE, "--steps", steps, "--global-batch", batch, "--out", tmp_path / "ddp.safetensors",
                    cwd=tmp_path)
    assert "saved" in out
    example = _example()
    single = example.train(steps, batch)
    ddp = fastff.load(tmp_path / "ddp.safetensors", model=example.make_model(3))
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values()):
        if name.endswith("_usage"):   # global hard counts: exactly the single-process counts
            assert torch.equal(a, b), name
            rows_per_count = 3 if name.endswith("node_usage") else 1   # depth-3 path vs one leaf
            assert a.sum() == rows_per_count * steps * batch
        else:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)
    # the run trained at all (not comparing two untouched initialisations)
    torch.manual_seed(0)
    init = example.make_model(3)
    assert (init[0].node_w - single[0].node_w).abs().max() > 1e-3


def test_ddp_reductions_are_global(tmp_path):
    _torchrun(ROOT / "tests" / "_ddp_worker.py", tmp_path / "r.json", cwd=tmp_path)
    ranks = json.loads((tmp_path / "r.json").read_text())
    assert len(ranks) == 2
    for r in ranks:
        assert r["aux_fff_fraction_diff"] < 1e-7 and r["aux_moe_fraction_diff"] < 1e-7
        assert r["aux_fff_prob_is_local"] and r["aux_moe_prob_is_local"]
        assert r["one_shot_usage_diff"] == 0 and r["one_shot_total"] == 32
        assert r["sync_usage_diff"] == 0 and r["sync_total"] == 64


def test_helpers_are_noops_in_one_process():
    layer = fastff.FFF(4, 2, 2, 2, usage="hard")
    from fastff.distributed import all_reduce_aux, all_reduce_usage, sync_usage
    handles = sync_usage(layer)
    layer(torch.randn(5, 4))
    before = dict(layer.aux), layer.leaf_usage.clone()
    all_reduce_aux(layer)
    all_reduce_usage(layer)
    assert all(torch.equal(before[0][k], layer.aux[k]) for k in before[0])
    assert torch.equal(before[1], layer.leaf_usage) and layer.leaf_usage.sum() == 5
    for h in handles:
        h.remove()
