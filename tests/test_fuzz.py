"""Hypothesis fuzzing of the public API's error contract (see fastff/_checks.py):

- bad constructor / loss arguments raise ValueError naming an offending argument; good ones
  build a layer that runs in train and eval mode;
- inputs of any type / shape / dtype / device either give an output of shape (..., out) in the
  layer's dtype and device, or raise TypeError (type, dtype) / ValueError (shape, device);
- NaN / inf propagate row-wise like nn.Linear, and check_finite turns them into ValueError.
"""
import math
import numbers

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastff
from fastff import kernels
from fastff._checks import get_check_finite
from fastff.functional import ACTIVATIONS

JUNK = st.sampled_from([None, "", "2", 2.0, 1.5, -0.0, float("nan"), float("inf"), True, False, [1], (2,),
                        np.float32(1.0), torch.tensor(2)])


def ints(low, high_drawn, invalid_big=None):
    """Mostly valid integers (Python and NumPy) plus out-of-range values and junk."""
    good = st.integers(low, high_drawn)
    bad = [st.integers(low - 3, low - 1), JUNK, good.map(np.int64)]
    if invalid_big is not None:
        bad.append(st.integers(invalid_big, invalid_big + 50))
    return st.one_of(good, good, *bad)


def fractions():
    return st.one_of(st.floats(0, 1), st.floats(-2, 3), st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 2), JUNK)


def choices(valid):
    return st.one_of(st.sampled_from(list(valid)), st.sampled_from(["RELU", "none", "x", 0, 1.0, None, True]))


def is_int(v, low, high=None):
    return (not isinstance(v, bool) and isinstance(v, numbers.Integral)
            and low <= v and (high is None or v <= high))


def is_fraction(v):
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and 0 <= v <= 1


def is_choice(v, valid):
    return any(v is c or (isinstance(v, type(c)) and v == c) for c in valid)


BACKEND_CHOICES = (None, "auto", *kernels.BACKENDS)
# backends that run CPU tensors (the triton backend needs CUDA; it has its own interpreter tests)
CPU_BACKENDS = tuple(b for b in BACKEND_CHOICES if b != "triton")
ACTS = tuple(ACTIVATIONS)

# name -> (strategy, validity oracle); the documented range of every constructor argument.
SPECS = {
    fastff.FFF: {
        "in_features": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "out_features": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "depth": (ints(0, 4, invalid_big=31), lambda v, a: is_int(v, 0, 30)),
        "leaf_width": (ints(1, 4), lambda v, a: is_int(v, 1)),
        "activation": (choices(ACTS), lambda v, a: is_choice(v, ACTS)),
        "dropout": (fractions(), lambda v, a: is_fraction(v)),
        "region_leak": (fractions(), lambda v, a: is_fraction(v)),
        "train_hardened": (st.booleans(), lambda v, a: True),
        "master_leaf": (choices([None, "scalar", "token"]), lambda v, a: is_choice(v, (None, "scalar", "token"))),
        "usage": (choices([None, "soft", "hard"]), lambda v, a: is_choice(v, (None, "soft", "hard"))),
        "master_width": (st.one_of(st.none(), ints(1, 4)),
                         lambda v, a: v is None or (a.get("master_leaf") is not None and is_int(v, 1))),
        "backend": (choices(BACKEND_CHOICES), lambda v, a: is_choice(v, BACKEND_CHOICES)),
        "train_mode": (choices(["soft", "hard_path"]), lambda v, a: is_choice(v, ("soft", "hard_path"))),
    },
    fastff.NeuronTree: {
        "in_features": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "out_features": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "depth": (ints(0, 4, invalid_big=31), lambda v, a: is_int(v, 0, 30)),
        "trees": (ints(1, 3), lambda v, a: is_int(v, 1)),
        "activation": (choices(ACTS), lambda v, a: is_choice(v, ACTS)),
        "bias": (st.booleans(), lambda v, a: True),
        "backend": (choices(BACKEND_CHOICES), lambda v, a: is_choice(v, BACKEND_CHOICES)),
    },
    fastff.MoE: {
        "in_features": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "out_features": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "experts": (ints(1, 4), lambda v, a: is_int(v, 1)),
        "expert_width": (ints(1, 4), lambda v, a: is_int(v, 1)),
        "k": (ints(1, 4), lambda v, a: is_int(v, 1, a["experts"] if is_int(a.get("experts"), 1) else None)),
        "activation": (choices(ACTS), lambda v, a: is_choice(v, ACTS)),
    },
    fastff.DenseFF: {
        "in_features": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "out_features": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "hidden": (ints(1, 5), lambda v, a: is_int(v, 1)),
        "activation": (choices(ACTS), lambda v, a: is_choice(v, ACTS)),
    },
}
REQUIRED = {fastff.FFF: 4, fastff.NeuronTree: 3, fastff.MoE: 4, fastff.DenseFF: 3}


@st.composite
def configs(draw, cls):
    names = list(SPECS[cls])
    n_optional = draw(st.integers(0, len(names) - REQUIRED[cls]))
    chosen = names[:REQUIRED[cls]] + draw(st.permutations(names[REQUIRED[cls]:]))[:n_optional]
    return {name: draw(SPECS[cls][name][0]) for name in chosen}


def _run_both_modes(layer):
    """A freshly built layer must run a training forward + backward and an eval forward."""
    x = torch.randn(7, layer.in_features)
    y = layer.train()(x)
    assert y.shape == (7, layer.out_features) and torch.isfinite(y).all()
    y.sum().backward()
    with torch.no_grad():
        y = layer.eval()(x)
    assert y.shape == (7, layer.out_features) and torch.isfinite(y).all()


@pytest.mark.parametrize("cls", list(SPECS), ids=lambda c: c.__name__)
@given(data=st.data())
def test_config_fuzz(cls, data):
    args = data.draw(configs(cls))
    bad = [name for name, value in args.items() if not SPECS[cls][name][1](value, args)]
    if bad:
        with pytest.raises(ValueError) as info:
            cls(**args)
        assert any(name in str(info.value) for name in bad), (bad, str(info.value))
    else:
        _run_both_modes(cls(**args))


@pytest.mark.parametrize("make", [
    lambda: fastff.FFF(4, 2, 1, 2, train_hardened="no"),
    lambda: fastff.NeuronTree(4, 2, 1, bias="false"),
    lambda: fastff.FFF(4, 2, 1, 2, master_width=-3),
])
def test_truthy_or_ignored_arguments_are_rejected(make):
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- inputs

LAYER_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
INPUT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                torch.bool, torch.complex64]


@st.composite
def layers(draw):
    kind = draw(st.sampled_from(["fff", "fff_master", "fff_hard_path", "tree", "moe", "dense"]))
    i, o = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    if kind.startswith("fff"):
        extra = {"master_leaf": "token"} if kind == "fff_master" else {}
        if kind == "fff_hard_path":
            extra["train_mode"] = "hard_path"
        layer = fastff.FFF(i, o, draw(st.integers(0, 3)), draw(st.integers(1, 3)), usage=draw(st.sampled_from(
            [None, "soft", "hard"])), backend=draw(st.sampled_from(CPU_BACKENDS)), **extra)
    elif kind == "tree":
        layer = fastff.NeuronTree(i, o, draw(st.integers(0, 3)), trees=draw(st.integers(1, 2)),
                                  bias=draw(st.booleans()), backend=draw(st.sampled_from(CPU_BACKENDS)))
    elif kind == "moe":
        e = draw(st.integers(1, 3))
        layer = fastff.MoE(i, o, e, draw(st.integers(1, 3)), k=draw(st.integers(1, e)))
    else:
        layer = fastff.DenseFF(i, o, draw(st.integers(1, 4)))
    return layer.to(draw(st.sampled_from(LAYER_DTYPES))).train(draw(st.booleans()))


def _expected_error(layer, x, layer_device):
    """The documented (error type, message pattern) for this input, or None if it is valid."""
    name = type(layer).__name__
    if not isinstance(x, torch.Tensor):
        return TypeError, name
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        return ValueError, name
    if not x.is_floating_point() or x.dtype != next(layer.parameters()).dtype:
        return TypeError, name
    if x.device.type != layer_device:
        return ValueError, name
    # the explicit numba backend runs eval, and the training forwards that use a backend
    uses_backend = not layer.training or isinstance(layer, fastff.NeuronTree) or getattr(layer, "train_mode", "") == "hard_path"
    if (uses_backend and getattr(layer, "backend", None) == "cpu" and layer_device == "cpu"
            and x.dtype not in (torch.float32, torch.float64)):
        return TypeError, "the 'cpu' backend supports float32 and float64"
    return None


@given(layer=layers(), data=st.data())
def test_input_fuzz(layer, data):
    layer_device = data.draw(st.sampled_from(["cpu", "cpu", "meta"]), label="layer device")
    layer = layer.to(layer_device)
    kind = data.draw(st.sampled_from(["tensor"] * 6 + ["list", "numpy", "none"]), label="kind")
    lead = data.draw(st.lists(st.integers(0, 3), max_size=2), label="lead dims")
    last = data.draw(st.one_of(st.just(layer.in_features), st.integers(0, 6)), label="last dim")
    dtype = data.draw(st.sampled_from([next(layer.parameters()).dtype] * 3 + INPUT_DTYPES), label="dtype")
    device = data.draw(st.sampled_from([layer_device, layer_device, "cpu", "meta"]), label="device")
    x = (torch.randn(*lead, last) * 3).to(dtype)
    if data.draw(st.booleans(), label="scalar"):
        x = x.new_tensor(1).to(dtype) if x.numel() else x.sum()
    if data.draw(st.booleans(), label="non-contiguous") and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    x = {"tensor": lambda: x.to(device), "list": x.tolist, "numpy": lambda: x.float().numpy(),
         "none": lambda: None}[kind]()
    error = _expected_error(layer, x, layer_device)
    grad = data.draw(st.booleans(), label="grad enabled")
    with torch.set_grad_enabled(grad):
        if error is not None:
            with pytest.raises(error[0], match=error[1]):
                layer(x)
            return
        try:
            y = layer(x)
        except ValueError as e:     # documented: forwards that read data cannot run on 'meta'
            assert layer_device == "meta" and "meta" in str(e), e
            return
    assert y.shape == (*x.shape[:-1], layer.out_features)
    assert y.dtype == x.dtype and y.device == x.device
    if not y.is_meta:
        assert torch.isfinite(y).all(), "finite inputs gave a non-finite output"
        if y.requires_grad:                     # the backward runs too, for every batch size (also empty)
            y.sum().backward()
            for p in layer.parameters():
                assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("make", [lambda: fastff.FFF(4, 3, 2, 2), lambda: fastff.FFF(4, 3, 2, 2, master_leaf="token"),
                                  lambda: fastff.NeuronTree(4, 3, 2, trees=2), lambda: fastff.DenseFF(4, 3, 5)])
def test_meta_device_infers_shapes(make):
    """Shape inference on 'meta' works for every data-independent forward (FFF: eval only)."""
    layer = make().to("meta")
    modes = [False] if isinstance(layer, fastff.FFF) else [False, True]
    for mode in modes:
        y = layer.train(mode)(torch.empty(2, 5, 4, device="meta"))
        assert y.shape == (2, 5, 3) and y.is_meta


# ---------------------------------------------------------------- NaN / inf

NAN_LAYERS = [lambda: fastff.FFF(4, 3, 2, 2), lambda: fastff.FFF(4, 3, 2, 2, master_leaf="scalar", usage="soft"),
              lambda: fastff.FFF(4, 3, 2, 2, train_mode="hard_path"),
              lambda: fastff.NeuronTree(4, 3, 2, trees=2), lambda: fastff.MoE(4, 3, 3, 2, k=2),
              lambda: fastff.DenseFF(4, 3, 5)]


@pytest.mark.parametrize("make", NAN_LAYERS)
@pytest.mark.parametrize("train", [True, False])
@given(rows=st.lists(st.sampled_from(["finite", "nan", "inf", "-inf"]), min_size=1, max_size=6),
       column=st.integers(0, 3), backend=st.sampled_from(CPU_BACKENDS))
def test_non_finite_inputs_propagate_row_wise(make, train, rows, column, backend):
    """Like nn.Linear: no error, a NaN row gives an all-NaN output row, and the finite rows get
    exactly the outputs they get without the non-finite rows in the batch."""
    torch.manual_seed(0)
    layer = make().train(train)
    if hasattr(layer, "backend"):
        layer.backend = backend
    x = torch.randn(len(rows), 4)
    for i, kind in enumerate(rows):
        if kind != "finite":
            x[i, column] = float(kind)
    with torch.no_grad():
        y = layer(x)
        finite = [i for i, kind in enumerate(rows) if kind == "finite"]
        if finite:
            torch.testing.assert_close(y[finite], layer(x[finite]), rtol=1e-5, atol=1e-6)
    assert y.shape == (len(rows), 3)
    for i, kind in enumerate(rows):
        if kind == "nan":
            assert torch.isnan(y[i]).all(), (i, y[i])


@pytest.mark.parametrize("make", NAN_LAYERS)
def test_check_finite_raises(make):
    layer = make()
    x = torch.randn(5, 4)
    x[3, 1] = float("inf")
    layer(x)                                    # default: propagates
    layer.check_finite = True
    with pytest.raises(ValueError, match=rf"{type(layer).__name__} got 1 non-finite"):
        layer(x)
    layer(torch.randn(5, 4))                    # finite input still runs
    layer.check_finite = None
    try:
        fastff.set_check_finite(True)
        with pytest.raises(ValueError, match="non-finite"):
            layer(x.double().float())
        layer.check_finite = False              # a layer's own setting wins over the global one
        layer(x)
    finally:
        fastff.set_check_finite(False)
    assert get_check_finite() is False
    with pytest.raises(ValueError, match="enabled must be True or False"):
        fastff.set_check_finite("yes")


# ---------------------------------------------------------------- losses

@given(mode=st.one_of(st.sampled_from(["reach", "mean"]), st.text(max_size=4), JUNK),
       alpha=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 5), JUNK))
def test_loss_argument_fuzz(mode, alpha):
    model = torch.nn.Sequential(fastff.FFF(4, 3, 2, 2), fastff.MoE(3, 3, 3, 2))
    model(torch.randn(6, 4))
    if is_choice(mode, ("reach", "mean")):
        loss = fastff.hardening_loss(model, mode=mode)
        assert loss.shape == () and torch.isfinite(loss)
    else:
        with pytest.raises(ValueError, match="mode"):
            fastff.hardening_loss(model, mode=mode)
    if not isinstance(alpha, bool) and isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0:
        loss = fastff.load_balancing_loss(model, alpha=alpha)
        assert loss.shape == () and not torch.isnan(loss)      # a huge alpha may overflow float32 to inf
        assert torch.isfinite(loss) or alpha > 1e30
    else:
        with pytest.raises(ValueError, match="alpha"):
            fastff.load_balancing_loss(model, alpha=alpha)


@pytest.mark.parametrize("loss", [fastff.hardening_loss, fastff.load_balancing_loss])
def test_loss_rejects_non_modules(loss):
    with pytest.raises(TypeError, match="model"):
        loss([torch.zeros(2)])
