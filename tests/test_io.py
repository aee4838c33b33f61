"""fastff.save / fastff.load: exact round trips, named mismatches, corrupted files."""
import importlib.util
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import fastff
from fastff import kernels
from fastff.io import serializable

LAYERS = [
    lambda: fastff.FFF(6, 3, 2, 4, master_leaf="token", usage="hard", master_width=5, region_leak=0.1),
    lambda: fastff.FFF(6, 3, 0, 2, master_leaf="scalar", usage="soft"),
    lambda: fastff.FFF(6, 3, 3, 2, train_mode="hard_path", usage="hard"),
    lambda: fastff.NeuronTree(6, 3, 2, trees=2, bias=False),
    lambda: fastff.NeuronTree(6, 3, 1, activation="relu"),
    lambda: fastff.MoE(6, 3, experts=4, expert_width=3, k=2),
    lambda: fastff.MoE(6, 3, experts=4, expert_width=3, gate="straight-through"),
    lambda: fastff.DenseFF(6, 3, 7, activation="silu"),
]


def _trained(layer, dtype=torch.float32):
    """The layer in ``dtype`` after one SGD step (so weights and usage counters are non-trivial)."""
    layer = layer.to(dtype).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(16, layer.in_features, dtype=dtype)).square().mean().backward()
    opt.step()
    return layer.eval()


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_bit_identical(make, dtype, tmp_path):
    layer = _trained(make(), dtype)
    x = torch.randn(9, 2, layer.in_features, dtype=dtype)
    fastff.save(layer, tmp_path / "m.safetensors")
    rng = torch.get_rng_state()
    back = fastff.load(tmp_path / "m.safetensors")
    assert torch.equal(torch.get_rng_state(), rng)          # loading does not consume the caller's RNG
    assert type(back) is type(layer) and not back.training
    assert back.extra_repr() == layer.extra_repr()
    assert _same_state(back, layer)
    with torch.no_grad():
        assert torch.equal(back(x), layer(x))
    assert all(p.requires_grad for p in back.parameters())


@given(depth=st.integers(0, 3), leaf=st.integers(1, 4), out=st.integers(1, 4),
       master=st.sampled_from([None, "scalar", "token"]), activation=st.sampled_from(["relu", "gelu", "tanh"]))
def test_round_trip_random_fff_configs(tmp_path_factory, depth, leaf, out, master, activation):
    path = tmp_path_factory.mktemp("rt") / "m.safetensors"
    layer = fastff.FFF(5, out, depth, leaf, activation=activation, master_leaf=master).eval()
    fastff.save(layer, path)
    x = torch.randn(20, 5)
    assert torch.equal(fastff.load(path)(x), layer(x))


# odd small shapes; every parameter is redrawn (zero-initialised gates too) before saving
ODD_LAYERS = [
    lambda: fastff.FFF(13, 7, 3, 2, master_leaf="token", activation="gelu"),
    lambda: fastff.FFF(13, 7, 3, 2, master_leaf="scalar", activation="silu", master_width=3),
    lambda: fastff.FFF(11, 5, 2, 3, activation="tanh"),
    lambda: fastff.FFF(7, 9, 0, 5, activation="gelu_tanh"),
    lambda: fastff.FFF(9, 3, 4, 1, train_mode="hard_path", activation="sigmoid"),
    lambda: fastff.NeuronTree(13, 7, 2, trees=3, activation="relu", bias=False),
    lambda: fastff.NeuronTree(5, 11, 3, trees=1, activation="gelu"),
    lambda: fastff.NeuronTree(15, 3, 1, trees=2, activation="identity", bias=False),
    lambda: fastff.MoE(13, 7, experts=5, expert_width=3, k=2),
    lambda: fastff.DenseFF(13, 7, 9, activation="gelu"),
]
# the inference backends that run CPU tensors (triton needs CUDA: its own test below)
CPU_INFERENCE_BACKENDS = ("reference", "torch", "cpu", "auto")


def _redrawn(layer):
    """``layer`` in eval mode with every parameter redrawn from N(0, 1)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer.eval()


def _assert_reload_computes_the_same_bits(layer, path, backends, device="cpu"):
    """Save ``layer``, load it on ``device``: every tensor in fresh 64-byte aligned memory and the
    same output bits on each of ``backends``."""
    fastff.save(layer, path)
    back = fastff.load(path, device=device)
    layer = layer.to(device)
    state = back.state_dict()
    assert len(state) == len(layer.state_dict()) > 0
    assert all(t.data_ptr() % 64 == 0 for t in state.values()), {k: t.data_ptr() % 64 for k, t in state.items()}
    x = torch.randn(50, layer.in_features, device=device)
    for backend in backends:
        with torch.no_grad(), kernels.forced_backend(backend):
            assert torch.equal(back(x), layer(x)), backend


@pytest.mark.parametrize("make", ODD_LAYERS)
def test_reload_computes_the_same_bits_on_every_backend(make, tmp_path):
    """BLAS may round differently on misaligned weights, so loaded tensors must not keep the
    byte offsets they have inside the file."""
    torch.manual_seed(0)
    _assert_reload_computes_the_same_bits(_redrawn(make()), tmp_path / "m.safetensors", CPU_INFERENCE_BACKENDS)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or not torch.cuda.is_available(),
                    reason="the triton backend runs CUDA tensors")
@pytest.mark.parametrize("make", ODD_LAYERS)
def test_reload_computes_the_same_bits_on_triton(make, tmp_path):
    torch.manual_seed(0)
    _assert_reload_computes_the_same_bits(_redrawn(make()), tmp_path / "m.safetensors", ("triton", "auto"), "cuda")


def test_attributes_changed_after_construction_are_saved(tmp_path):
    layer = fastff.FFF(4, 2, 2, 3)
    layer.region_leak, layer.backend = 0.2, "torch"
    fastff.save(layer, tmp_path / "m.safetensors")
    back = fastff.load(tmp_path / "m.safetensors")
    assert back.region_leak == 0.2 and back.backend == "torch"


class Net(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.ff = fastff.FFF(8, 8, depth, 2, usage="hard")
        self.tree = fastff.NeuronTree(8, 8, 1)
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(self.tree(self.ff(self.embed(x))))


def test_any_model_loads_into_a_skeleton(tmp_path):
    net = Net().train()
    net(torch.randn(8, 4))
    fastff.save(net.eval(), tmp_path / "net.safetensors")
    with pytest.raises(ValueError, match=r"holds a .*Net, which fastff cannot rebuild by itself.*model=model"):
        fastff.load(tmp_path / "net.safetensors")
    skeleton = Net()
    out = fastff.load(tmp_path / "net.safetensors", model=skeleton)
    assert out is skeleton and skeleton.training            # a skeleton keeps its mode
    x = torch.randn(5, 4)
    assert _same_state(skeleton, net) and torch.equal(skeleton.eval()(x), net(x))


def test_tied_weights_stay_tied(tmp_path):
    a = nn.Sequential(nn.Linear(4, 4), fastff.FFF(4, 4, 1, 2), nn.Linear(4, 4))
    a[2].weight = a[0].weight
    fastff.save(a, tmp_path / "t.safetensors")
    b = nn.Sequential(nn.Linear(4, 4), fastff.FFF(4, 4, 1, 2), nn.Linear(4, 4))
    b[2].weight = b[0].weight
    fastff.load(tmp_path / "t.safetensors", model=b)
    assert b[2].weight is b[0].weight and torch.equal(b[0].weight, a[0].weight)


@serializable
class Block(nn.Module):
    """A user model made rebuildable by the decorator."""

    def __init__(self, width, depth, scale=1.0):
        super().__init__()
        self.ff = fastff.FFF(width, width, depth, 2)
        self.factor = scale

    def forward(self, x):
        return x + self.factor * self.ff(x)


def test_serializable_user_class_rebuilds_without_skeleton(tmp_path):
    block = Block(6, 2, scale=0.5).eval()
    fastff.save(block, tmp_path / "b.safetensors")
    back = fastff.load(tmp_path / "b.safetensors")
    x = torch.randn(3, 6)
    assert isinstance(back, Block) and back.factor == 0.5 and torch.equal(back(x), block(x))


@pytest.mark.parametrize("saved,skeleton,message", [
    (lambda: fastff.FFF(4, 2, 2, 3), lambda: fastff.FFF(4, 2, 3, 3), r"the model \(FFF\): depth: file 2, model 3"),
    (lambda: fastff.FFF(4, 2, 2, 3), lambda: fastff.FFF(4, 2, 2, 3, activation="gelu"),
     r"activation: file 'relu', model 'gelu'"),
    (lambda: fastff.NeuronTree(4, 2, 2), lambda: fastff.NeuronTree(4, 2, 2, bias=False),
     r"bias: file True, model False.*tensors in the file that the model does not have: \['b_out'\]"),
    (lambda: fastff.FFF(4, 2, 2, 3), lambda: fastff.NeuronTree(4, 2, 2), r"file has a FFF, model a NeuronTree"),
    (lambda: Net(2), lambda: Net(3), r"layer 'ff' \(FFF\): depth: file 2, model 3.*'ff.node_w': file shape \(3, 8\)"),
    (lambda: fastff.DenseFF(4, 2, 5).double(), lambda: fastff.DenseFF(4, 2, 5),
     r"'fc1.weight': file dtype torch.float64, model torch.float32"),
])
def test_other_config_names_the_mismatch_and_loads_nothing(saved, skeleton, message, tmp_path):
    fastff.save(saved(), tmp_path / "m.safetensors")
    target = skeleton()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        fastff.load(tmp_path / "m.safetensors", model=target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def _file_and_twin(tmp_path):
    layer = _trained(fastff.FFF(6, 3, 2, 4, usage="hard"))
    path = tmp_path / "m.safetensors"
    fastff.save(layer, path)
    return layer, path, path.read_bytes()


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, 0.99, -1])
def test_truncated_file_raises_and_loads_nothing(keep, tmp_path):
    layer, path, data = _file_and_twin(tmp_path)
    cut = keep if isinstance(keep, int) and keep >= 0 else (len(data) + keep if keep == -1 else int(keep * len(data)))
    path.write_bytes(data[:cut])
    target = fastff.FFF(6, 3, 2, 4, usage="hard")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"not a valid safetensors file|corrupted"):
        fastff.load(path, model=target)
    with pytest.raises(ValueError):
        fastff.load(path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@given(position=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_flipped_byte_raises_or_loads_the_exact_model(tmp_path_factory, position, xor):
    """A corrupted byte anywhere (header, metadata, tensor data) is detected; the only allowed
    outcome besides ValueError is the identical model (e.g. a flip in JSON whitespace padding)."""
    layer, path, data = _file_and_twin(tmp_path_factory.mktemp("flip"))
    i = int(position * len(data))
    path.write_bytes(data[:i] + bytes([data[i] ^ xor]) + data[i + 1:])
    try:
        back = fastff.load(path)
    except ValueError:
        return
    assert _same_state(back, layer) and back.extra_repr() == layer.extra_repr()


def test_flipped_tensor_byte_is_named(tmp_path):
    layer, path, data = _file_and_twin(tmp_path)
    path.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])   # last bytes: the last tensor
    with pytest.raises(ValueError, match=r"corrupted: checksum mismatch in tensor\(s\) \['w2'\]"):
        fastff.load(path)


def test_an_argument_added_after_the_file_was_written_counts_as_its_default(tmp_path):
    """A file whose layer records lack a constructor argument (written before the class had it)
    loads into a model that has that argument's default, and is refused for another value."""
    import json

    from safetensors import safe_open

    from fastff.io import _text_digest

    torch.manual_seed(0)
    model = nn.Sequential(fastff.MoE(6, 3, experts=4, expert_width=3), nn.Linear(3, 2)).eval()
    fastff.save(model, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        meta, tensors = json.loads(f.metadata()["fastff"]), {k: f.get_tensor(k) for k in f.keys()}
    del meta["layers"]["0"]["config"]["gate"]                # as written before MoE had a gate
    text = json.dumps(meta)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"fastff": text, "fastff_sha256": _text_digest(text)})
    twin = nn.Sequential(fastff.MoE(6, 3, experts=4, expert_width=3), nn.Linear(3, 2)).eval()
    x = torch.randn(5, 6)
    assert torch.equal(fastff.load(tmp_path / "old.safetensors", model=twin)(x), model(x))
    other = nn.Sequential(fastff.MoE(6, 3, experts=4, expert_width=3, gate="straight-through"), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="gate: file 'softmax', model 'straight-through'"):
        fastff.load(tmp_path / "old.safetensors", model=other)


def test_not_a_fastff_file_and_missing_file(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no fastff metadata"):
        fastff.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        fastff.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        fastff.load(tmp_path / "junk.safetensors")


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastff.save("model", tmp_path / "m.safetensors")
    fastff.save(fastff.FFF(4, 2, 1, 2), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or None"):
        fastff.load(tmp_path / "m.safetensors", model={"w": 1})
    with pytest.raises(ValueError, match="'meta' device"):
        fastff.save(fastff.FFF(4, 2, 1, 2).to("meta"), tmp_path / "meta.safetensors")
    assert not (tmp_path / "meta.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]    # no temporary file left behind


def test_saved_files_are_readable_like_any_written_file(tmp_path):
    path = tmp_path / "m.safetensors"
    fastff.save(fastff.FFF(3, 2, 1, 2), path)
    assert path.stat().st_mode & 0o777 == 0o644
