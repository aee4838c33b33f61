"""The baselines next to carved FFFs: pruned dense FFNs (prune + distill + distill_model), int8
dynamic quantization of everything but fastff layers, and the human-label data and scores."""
import numpy as np
import pytest
import torch
from torch import nn

import fastff
from fastff.data import DataFormatError
from fastff.data.similarity import lee_corpus, polarity_sentences
from fastff.models import DenseWeights, carve, convert_blocks, distill, distill_model, neuron_importance
from fastff.models.prune import prune
from fastff.models.quantize import int8_linear_names, quantize_int8

from test_models import embedding_error, random_batches, tiny_bert


def dense_ffn(d_in=12, hidden=24, d_out=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g, dtype=dtype) / s[-1] ** 0.5
    return DenseWeights(w(hidden, d_in), w(hidden), w(d_out, hidden), w(d_out), "gelu")


def test_prune_keeps_the_most_important_neurons_and_all_is_exact():
    dense = dense_ffn()
    x = torch.randn(300, 12, dtype=torch.float64)
    full = prune(dense, 24, x)
    assert isinstance(full.layer, fastff.DenseFF) and full.dropped.numel() == 0 and full.captured == pytest.approx(1)
    assert torch.allclose(full.layer(x), dense(x), atol=1e-10)
    p = prune(dense, 6, x)
    imp = neuron_importance(dense, x)[1].mean(0)
    assert set(p.kept.tolist()) == set(imp.topk(6).indices.tolist()) and p.layer.hidden == 6
    # dropped neurons are replaced by their mean activation: the mean output is kept
    assert torch.allclose(p.layer(x).mean(0), dense(x).mean(0), atol=1e-10)
    with pytest.raises(ValueError, match="neurons"):
        prune(dense, 25, x)


def test_distill_refits_and_trains_a_pruned_layer():
    dense = dense_ffn(seed=1)
    x = torch.randn(400, 12, dtype=torch.float64)
    layer = prune(dense, 8, x).layer
    stats = distill(layer, dense, x, steps=30, lr=1e-2, progress=False)
    assert stats["rel_refit"] < stats["rel_before"] and stats["rel_after"] <= stats["rel_refit"]
    with pytest.raises(TypeError, match="DenseFF"):
        distill(nn.Linear(12, 10), dense, x)


def test_distill_model_trains_pruned_blocks_only():
    dense = tiny_bert(init_range=0.2, seed=2)
    calib, fresh = random_batches(2), random_batches(102)

    def make(fit):
        layer = prune(fit.dense, 16, fit.inputs, fit.dim_weight, fit.token_weight).layer
        distill(layer, fit.dense, fit.inputs, targets=fit.targets, dim_weight=fit.dim_weight,
                token_weight=fit.token_weight, progress=False)
        return layer

    model = convert_blocks(dense, calib, make, target="residual", progress=False)
    assert all(isinstance(layer.intermediate, fastff.DenseFF) for layer in model.encoder.layer)
    attention = model.encoder.layer[0].attention.self.query.weight.clone()
    fc1 = model.encoder.layer[0].intermediate.fc1.weight.clone()
    before = embedding_error(model, dense, fresh)
    stats = distill_model(model, dense, calib, steps=30, lr=1e-3, progress=False)
    assert stats["loss_last"] < stats["loss_first"] and embedding_error(model, dense, fresh) < before
    assert not torch.equal(model.encoder.layer[0].intermediate.fc1.weight, fc1)
    assert torch.equal(model.encoder.layer[0].attention.self.query.weight, attention)


def test_quantize_int8_skips_fastff_layers():
    dense = tiny_bert()
    linear = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    assert int8_linear_names(dense) == linear
    q = quantize_int8(dense)
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert all(type(m) is nn.Linear for m in dense.modules() if isinstance(m, nn.Linear))   # original untouched
    model = convert_blocks(dense, random_batches(1), lambda fit: carve(fit.dense, 1, 16, fit.inputs, master=8).layer,
                           progress=False)
    names = int8_linear_names(model)
    assert names and not any("intermediate" in n for n in names)         # the FFF and its master leaf stay float
    ids = random_batches(3)[0]
    with torch.no_grad():
        a, b = model(**ids).last_hidden_state, quantize_int8(model)(**ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert isinstance(quantize_int8(model).encoder.layer[0].intermediate, fastff.FFF)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_int8(fastff.FFF(4, 4, 1, 2))


def test_human_label_files_are_parsed_and_checked(tmp_path):
    (tmp_path / "lee.cor").write_bytes("Caf\xe9 prices rose.\nStocks fell.\nA cat sat.\n".encode("latin-1"))
    (tmp_path / "similarities0-1.txt").write_text("1 0.5 0.2\n0 1 0.3\n0 0 1\n")
    docs, pairs = lee_corpus(tmp_path)
    assert docs[0] == "Café prices rose." and pairs.tolist() == [0.5, 0.2, 0.3]
    (tmp_path / "pang_lee_polarity.cor").write_bytes("__label__pos a fine film — really\n__label__neg dull .\n"
                                                     .encode("cp1252"))
    sentences, labels = polarity_sentences(tmp_path)
    assert sentences == ["a fine film — really", "dull ."] and labels.tolist() == [1, 0]
    (tmp_path / "similarities0-1.txt").write_text("1 0.5\n0 1\n")
    with pytest.raises(DataFormatError, match="3x3"):
        lee_corpus(tmp_path)
    (tmp_path / "pang_lee_polarity.cor").write_text("__label__maybe so so\n")
    with pytest.raises(DataFormatError, match="__label__pos"):
        polarity_sentences(tmp_path)


def test_human_scores_measure_agreement_with_labels():
    from fastff.apps.convert_minilm import human_scores
    g = torch.Generator().manual_seed(0)
    topics = nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    lee = nn.functional.normalize(topics.repeat(2, 1) + 0.3 * torch.randn(10, 16, generator=g), dim=1)
    ratings = (lee @ lee.T).numpy()[np.triu_indices(10, 1)]          # ratings that the cosines reproduce
    labels = np.arange(40) % 2
    pol = torch.randn(40, 16, generator=g) + torch.tensor(labels)[:, None] * 2.0
    good = human_scores(lee, ratings, pol, labels)
    assert good["lee_pearson"] == pytest.approx(1.0) and good["polarity_acc"] > 0.9 and good["polarity_cv"] == "5 x 10"
    noise = human_scores(torch.randn(10, 16, generator=g), ratings, torch.randn(40, 16, generator=g), labels)
    assert noise["lee_pearson"] < 0.9 and noise["polarity_acc"] < 0.8
