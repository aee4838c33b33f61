"""The feedforward family registry: geometry without building, option checking, and a new family
registered from a test reaching every command (CLI options, classifier and LM training, save /
load, a bench row) without any other file knowing it."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

import fastff
from fastff.apps.cli import main
from fastff.io import serializable
from fastff.layers import families as F
from fastff.models.quantize import int8_linear_names
from fastff.training import lm as L
from fastff.training import trainer as T


@pytest.mark.parametrize("name", ["dense", "fff", "neuron-tree", "moe"])
def test_geometry_matches_the_built_layer(name):
    """Training width and neurons per token from the options alone equal the layer's own."""
    rng = random.Random(0)
    fam = F.family(name)
    for _ in range(12):
        options, width = {}, rng.choice([8, 16, 24, 48, 64, 127, 256])
        if name == "fff":
            options = dict(leaf=rng.choice([w for w in (1, 2, 3, 4, 8) if width % w == 0 and
                                            (width // w) & (width // w - 1) == 0] or [width]),
                           master_leaf=rng.choice(["none", "scalar", "token"]))
        elif name == "neuron-tree":
            options = dict(trees=rng.choice([1, 2, 3]), depth=rng.choice([None, 0, 2]),
                           dense_slice=rng.choice([0, 0, 1, 5]), route_bias=rng.choice([0.0, 1e-3]),
                           gate=rng.choice(["none", "path"]))
        elif name == "moe":
            options = dict(leaf=rng.choice([w for w in (4, 8) if (width // w) & (width // w - 1) == 0 and width % w == 0]
                                           or [width]), top_k=1)
        layer = fam.build(5, 3, width, options)
        geo = fam.geometry(width, options)
        assert (geo.training_width, geo.neurons_per_token) == (layer.training_width, layer.neurons_per_inference)
        assert F.family_of(layer) is fam


def test_bad_options_name_what_is_allowed():
    with pytest.raises(ValueError, match="unknown neuron-tree option.*'leaf'.*takes: trees, depth, activation, bias"):
        F.make_ffn("neuron-tree", 4, 4, 15, leaf=8)
    with pytest.raises(ValueError, match="fff option 'master_leaf' must be one of 'none', 'scalar', 'token'"):
        F.make_ffn("fff", 4, 4, 16, master_leaf="yes")
    with pytest.raises(ValueError, match="fff option 'region_leak' must be in \\[0.0, 0.5\\]"):
        F.make_ffn("fff", 4, 4, 16, region_leak=0.7)
    with pytest.raises(ValueError, match="moe top_k must be <= experts"):
        F.make_ffn("moe", 4, 4, 16, leaf=8, top_k=3)
    with pytest.raises(ValueError, match="ffn must be one of 'dense', 'fff', 'neuron-tree', 'moe'"):
        F.family("conv")
    assert F.family("ff") is F.family("dense")


# ----------------------------------------------------------------------------- a family from outside

@serializable
class ScaledFF(nn.Module):
    """A test-only feedforward: ``scale * fc2(relu(fc1(x)))``, x (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, hidden: int, scale: float = 1.0):
        super().__init__()
        self.in_features, self.out_features, self.hidden, self.scale = in_features, out_features, hidden, scale
        self.fc1, self.fc2 = nn.Linear(in_features, hidden), nn.Linear(hidden, out_features)

    training_width = property(lambda self: self.hidden)
    neurons_per_inference = property(lambda self: self.hidden)

    def forward(self, x):
        return self.scale * self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def scaled_family():
    fam = F.register(F.Family(
        "scaled", ScaledFF, (F.Option("scale", float, 1.0, "output scale", low=0.0),),
        lambda i, o, width, opts, **runtime: ScaledFF(i, o, width, opts["scale"]),
        lambda width, opts: F.Geometry(width, width), "test-only scaled dense feedforward"))
    yield fam
    F.unregister("scaled")


def test_registering_a_family_reaches_every_command(scaled_family, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--scale" in capsys.readouterr().out

    # classifier training, its run directory, reloading
    assert main(["train", "--data", "digits", "--limit", "200", "--ffn", "scaled", "--width", "16", "--scale",
                 "0.5", "--epochs", "1", "--quiet", "--out", str(tmp_path / "clf")]) == 0
    model, cfg = T.load_run(tmp_path / "clf")
    assert isinstance(model.layer, ScaledFF) and model.layer.scale == 0.5 and cfg.ffn_options == {"scale": 0.5}
    with pytest.raises(ValueError, match="--leaf do\\(es\\) not apply to --ffn scaled; scaled takes --scale"):
        main(["train", "--data", "digits", "--ffn", "scaled", "--leaf", "4", "--out", str(tmp_path / "x")])

    # language-model training and generation
    text = tmp_path / "t.txt"
    text.write_text("the king and the queen of the land\n" * 60)
    assert main(["lm", "train", "--text", str(text), "--ffn", "scaled", "--width", "8", "--scale", "2", "--layers",
                 "1", "--dim", "8", "--heads", "2", "--context", "8", "--steps", "4", "--batch", "2", "--eval-every",
                 "2", "--eval-batches", "1", "--quiet", "--out", str(tmp_path / "lm")]) == 0
    gpt, _, config = L.load_run(tmp_path / "lm")
    assert all(isinstance(f, ScaledFF) and f.scale == 2.0 for f in gpt.ffns)
    assert main(["lm", "generate", str(tmp_path / "lm"), "--prompt", "the", "--tokens", "3"]) == 0

    # save / load of the layer on its own
    layer = ScaledFF(3, 2, 5, 0.25).eval()
    fastff.save(layer, tmp_path / "layer.safetensors")
    x = torch.randn(4, 3)
    assert torch.equal(fastff.load(tmp_path / "layer.safetensors")(x), layer(x))

    # a bench row against dense of the same width
    capsys.readouterr()
    assert main(["bench", "--layer", "scaled", "--width", "16", "--dim", "8", "--batch", "1", "--repeats", "1",
                 "--warmup", "0", "--no-limits", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["backend"] for r in rows} >= {"dense", "layer"} and all(r["width"] == 16 for r in rows)

    # int8 quantization leaves it alone (the family says int8=False)
    assert int8_linear_names(nn.Sequential(ScaledFF(3, 2, 5), nn.Linear(2, 2)), feedforwards=True) == ["1"]


def test_registration_rules(scaled_family):
    with pytest.raises(ValueError, match="already registered"):
        F.register(scaled_family)
    clash = F.Family("clash", ScaledFF, (F.Option("leaf", str, "a", "a leaf of another type"),),
                     scaled_family.make, scaled_family.shape, "clashing option type")
    with pytest.raises(ValueError, match="option 'leaf' of 'clash' is str, but 'fff' declares it int"):
        F.register(clash)
