"""The GPT model: shapes per FFN kind, causality, KV-cache decoding, save/load, a tiny training run."""
import dataclasses
import json

import pytest
import torch

import fastff
from fastff.data.text import CharVocab, batches, split_text
from fastff.models.gpt import GPT, GPTConfig

VOCAB, CONTEXT = 13, 16
KINDS = [("dense", {}), ("fff", {"train_mode": "soft"}), ("fff", {"train_mode": "hard_path"}),
         ("neuron-tree", {}), ("moe", {})]
KIND_IDS = ["dense", "fff-soft", "fff-hard_path", "neuron-tree", "moe"]


def tiny(kind="dense", options=None, **overrides) -> GPTConfig:
    settings = dict(vocab_size=VOCAB, context=CONTEXT, layers=2, heads=2, dim=32, ffn=kind, ffn_width=64,
                    ffn_options=options or {})
    return GPTConfig(**(settings | overrides))


def build(cfg: GPTConfig, seed: int = 0, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).to(dtype)


def tokens(*shape, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,options", KINDS, ids=KIND_IDS)
def test_shapes_loss_and_gradients(kind, options):
    model = build(tiny(kind, options)).train()
    idx = tokens(2, 3, 10)                                            # leading dims (2, 3)
    logits, loss = model(idx, targets=tokens(2, 3, 10, seed=2))
    assert logits.shape == (2, 3, 10, VOCAB) and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0
    model.eval()
    logits, loss = model(tokens(4, CONTEXT))
    assert logits.shape == (4, CONTEXT, VOCAB) and loss is None


@pytest.mark.parametrize("kind,options", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_future_tokens_do_not_change_past_logits(kind, options, mode):
    model = build(tiny(kind, options)).train(mode == "train")
    idx = tokens(2, CONTEXT)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    torch.manual_seed(3)                                              # same draws for any random op
    a, _ = model(idx)
    torch.manual_seed(3)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("kind,options", KINDS, ids=KIND_IDS)
def test_kv_cache_decoding_equals_full_forward(kind, options):
    model = build(tiny(kind, options), dtype=torch.float64).eval()  # float64: no routing flips
    idx = tokens(3, CONTEXT)
    with torch.inference_mode():
        full, _ = model(idx)
        cache = model.new_cache(3)
        steps = [model.forward_step(idx[:, :5], cache), model.forward_step(idx[:, 5:8], cache)]
        steps += [model.forward_step(idx[:, t:t + 1], cache) for t in range(8, CONTEXT)]
        assert cache.length == CONTEXT
        with pytest.raises(ValueError, match="do not fit"):
            model.forward_step(idx[:, :1], cache)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


def test_generate_samples_with_the_cache_and_restores_the_mode():
    model = build(tiny("fff", {"train_mode": "hard_path", "master_leaf": "token"})).train()
    prompt = tokens(2, 4)
    out = model.generate(prompt, 12, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, CONTEXT) and torch.equal(out[:, :4], prompt) and model.training
    again = model.generate(prompt, 12, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    greedy = model.generate(prompt, 3, temperature=0)
    model.eval()
    expected = prompt
    for _ in range(3):                                                # greedy decoding without a cache
        expected = torch.cat([expected, model(expected)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expected)


def test_bad_inputs_raise_clear_errors():
    model = build(tiny())
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="exceeds the context of 16; ask for at most 6 new tokens"):
        model.generate(tokens(1, 10), 7)
    with pytest.raises(ValueError, match="idx has 17 tokens but the model's context is 16"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match=r"token ids in \[0, 13\]; they must be in \[0, 13\)"):
        model(torch.tensor([[0, 13]]))
    with pytest.raises(ValueError, match="idx is empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="not in the vocabulary.*'Z'"):
        CharVocab.from_text("abc").encode("abZ")


def test_config_validation_and_json_round_trip():
    cfg = tiny("fff", {"train_mode": "hard_path", "master_leaf": "token", "leaf": 16}, ffn_width=None)
    assert cfg.ffn_width == 4 * cfg.dim
    assert cfg.ffn_options["leaf"] == 16 and cfg.ffn_options["activation"] == "relu"   # completed with defaults
    assert GPTConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    for bad, message in [(dict(heads=3), "divisible by heads"), (dict(layers=0), "layers must be >= 1"),
                         (dict(ffn="mlp"), "ffn must be one of"), (dict(dropout=1.0), "dropout"),
                         (dict(ffn="fff", ffn_options={"leaf": "x"}), "fff option 'leaf' must be an integer"),
                         (dict(ffn="fff", ffn_options={"train_mode": "x"}), "one of 'soft', 'hard_path'"),
                         (dict(ffn="fff", ffn_width=100, ffn_options={"leaf": 8}), "leaf times a power of two")]:
        with pytest.raises(ValueError, match=message):
            tiny(**bad)
    with pytest.raises(ValueError, match="unknown dense option.*'train_mode'; dense takes: activation"):
        tiny("dense", {"train_mode": "hard_path"})
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict(dataclasses.asdict(cfg) | {"width": 3})


def test_config_of_the_earlier_format_converts():
    """Flat feedforward fields of earlier configs move into ffn_options (those the family takes)."""
    old = dict(vocab_size=VOCAB, context=CONTEXT, layers=2, heads=2, dim=32, dropout=0.0, ffn="neuron-tree",
               ffn_width=63, leaf=8, trees=1, depth=4, top_k=1, activation="relu", ffn_options={"usage": "hard"})
    cfg = GPTConfig.from_dict(old)
    assert cfg.ffn_options == {"trees": 1, "depth": 4, "activation": "relu", "bias": True, "route_bias": 0.0,
                               "gate": "none", "dense_slice": 0}
    assert cfg.usage_counters and GPT(cfg).ffns[0].usage == "hard"


def test_neuron_counts():
    dense, fff = build(tiny("dense")), build(tiny("fff", {"leaf": 8}))
    assert dense.ffn_neurons_per_token == dense.ffn_training_width == 2 * 64
    assert fff.ffn_training_width == 2 * 64 and fff.ffn_neurons_per_token == 2 * (3 + 8)   # depth 3 + one leaf
    assert dense.n_params == sum(p.numel() for p in set(dense.parameters()))
    assert dense.head.weight is dense.tok_emb.weight


@pytest.mark.parametrize("kind,options", [KINDS[0], ("fff", {"train_mode": "hard_path", "master_leaf": "token"})],
                         ids=["dense", "fff-master"])
def test_save_load_round_trip(tmp_path, kind, options):
    cfg = tiny(kind, options)
    model = build(cfg, seed=0).eval()
    fastff.save(model, tmp_path / "gpt.safetensors")
    loaded = fastff.load(tmp_path / "gpt.safetensors", model=build(cfg, seed=1).eval())
    assert loaded.head.weight is loaded.tok_emb.weight
    idx = tokens(2, CONTEXT)
    assert torch.equal(model(idx)[0], loaded(idx)[0])


@pytest.mark.parametrize("kind,options", [KINDS[0], KINDS[2]], ids=["dense", "fff-hard_path"])
def test_tiny_training_run_lowers_the_loss(kind, options):
    text = "the quick brown fox jumps over the lazy dog. " * 100
    splits = split_text(text, val_fraction=0.1, test_fraction=0.0)
    model = build(tiny(kind, options, vocab_size=len(splits.vocab))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x_val, y_val = batches(splits.val, CONTEXT, 32, torch.Generator().manual_seed(1))

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(x_val, y_val)[1].item()
        model.train()
        return loss

    before = val_loss()
    for _ in range(60):
        _, loss = model(*batches(splits.train, CONTEXT, 16, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < before - 1.0, (before, after)
