"""Save / load models with fastff layers as safetensors files (weights + the config to rebuild).

File layout: a standard safetensors file. The tensors are ``model.state_dict()`` (moved to CPU,
made contiguous; tensors that are the same tensor under two names, e.g. tied weights, are stored
once). The metadata key ``"fastff"`` holds JSON with:

- ``root``: the class of the saved model and, if it is a *serializable* class (every fastff layer,
  and any class decorated with ``serializable``), its constructor arguments;
- ``layers``: class and constructor arguments of every serializable submodule, by module path;
- ``sha256``: a digest per stored tensor, so a corrupted file is detected;
- ``aliases``: names that refer to an already stored tensor;

and ``"fastff_sha256"`` the digest of that JSON text.

Contract:

- ``load(path)`` rebuilds a serializable model (e.g. a bare ``FFF``) from the file alone.
- Any other ``nn.Module``: ``load(path, model=skeleton)`` where ``skeleton`` is built by the same
  code as the saved model (its weights are overwritten). Every serializable layer inside must
  have the same class and constructor arguments as in the file (an argument the file lacks, added
  to the class after it was written, counts as its default).
- Before a single tensor is assigned the whole file is read and checked (checksums, tensor
  names, shapes, dtypes, layer configs); any problem raises ``ValueError`` naming it and the
  model is left untouched. A missing file raises ``FileNotFoundError``.
- Constructor arguments are read from the module's same-named attributes when those hold plain
  values (so ``layer.region_leak = 0.1`` after construction is saved), else from the values
  recorded at construction. ``aux`` (per-forward statistics) and ``check_finite`` are not saved.
- A rebuilt model is returned in eval mode; a skeleton keeps its mode. Eval outputs after a
  reload are bit-identical (same bits, same dtype: a skeleton must already have the file's
  dtypes, a rebuilt model takes them from the file).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import tempfile

import torch
from torch import nn

FORMAT = 1
_REGISTRY: dict[str, type] = {}
_PLAIN = (type(None), bool, int, float, str)


def _class_name(cls: type) -> str:
    return cls.__name__ if cls.__module__.startswith("fastff.") else f"{cls.__module__}.{cls.__qualname__}"


def serializable(cls: type) -> type:
    """Class decorator: record each instance's constructor arguments (``_fastff_init``) and
    register the class so ``fastff.load`` can rebuild it. Arguments must be plain values
    (None, bool, int, float, str, or lists of them). Applied to every fastff layer."""
    init = cls.__dict__.get("__init__")
    if init is not None and not getattr(init, "_fastff_records", False):
        sig = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(sig.parameters)))
            self._fastff_init = arguments            # the outermost (most derived) __init__ wins

        recording_init._fastff_records = True
        cls.__init__ = recording_init
    _REGISTRY[_class_name(cls)] = cls
    return cls


def _registry() -> dict[str, type]:
    return _REGISTRY


def build(class_name: str, **config) -> nn.Module:
    """A new instance of a registered class (every fastff layer, or a class decorated with
    ``serializable``) by its name, e.g. ``build("FFF", in_features=8, out_features=2, depth=3,
    leaf_width=4)``."""
    cls = _registry().get(class_name)
    if cls is None:
        raise ValueError(f"unknown layer class {class_name!r}; known: {sorted(_registry())}")
    return cls(**config)


def _is_plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, (list, tuple)) and all(map(_is_plain, value)))


def config_of(module: nn.Module) -> dict:
    """Constructor arguments that rebuild ``module`` (a registered class); see the module doc."""
    recorded = getattr(module, "_fastff_init", {})
    config = {}
    for name, param in inspect.signature(type(module).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        current = getattr(module, name, None)
        if hasattr(module, name) and _is_plain(current):
            value = current
        elif name in recorded:
            value = recorded[name]
        else:
            raise ValueError(f"cannot save {type(module).__name__}: constructor argument '{name}' is neither "
                             f"recorded nor a plain attribute; decorate the class with fastff.io.serializable")
        if not _is_plain(value):
            raise ValueError(f"cannot save {type(module).__name__}: constructor argument '{name}' = {value!r} is "
                             f"not a plain value (None, bool, int, float, str or a list of them)")
        config[name] = list(value) if isinstance(value, tuple) else value
    return config


def _defaults(cls: type) -> dict:
    """The constructor arguments of ``cls`` that have a default, with it."""
    return {name: list(p.default) if isinstance(p.default, tuple) else p.default
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _layer_records(model: nn.Module) -> dict[str, dict]:
    registry = _registry()
    return {path: {"class": _class_name(type(m)), "config": config_of(m)}
            for path, m in model.named_modules() if registry.get(_class_name(type(m))) is type(m)}


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def save(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``model``'s state_dict and configs to ``path`` (safetensors, written atomically:
    a crash mid-write never leaves a partial file under ``path``). ``metadata``: a JSON object
    stored with them (covered by the file's checksum), read back by ``saved_metadata``."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise ValueError(f"cannot save tensor '{name}': it is on the 'meta' device and holds no data")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    records = _layer_records(model)
    root = {"class": _class_name(type(model))}
    if "" in records:
        _check_rebuilds(model, records[""]["config"])
        root["config"] = records[""]["config"]
    meta = {"format": FORMAT, "root": root, "layers": records, "aliases": aliases,
            "sha256": {name: _digest(t) for name, t in tensors.items()}, "metadata": dict(metadata or {})}
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        text = json.dumps(meta)
        save_file(tensors, tmp, metadata={"fastff": text, "fastff_sha256": _text_digest(text)})
        os.chmod(tmp, 0o644)                  # mkstemp's (and safetensors') 0600 would make saved models private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def saved_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` object ``save`` stored in ``path`` ({} if none); checksum verified."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: '{path}'")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise ValueError(f"cannot read '{path}': not a valid safetensors file ({type(e).__name__}: {e})") from e
    text = header.get("fastff")
    if text is None or header.get("fastff_sha256") != _text_digest(text):
        raise ValueError(f"'{path}' has no intact fastff metadata: it was not written by fastff.save, or is corrupted")
    return json.loads(text).get("metadata", {})


def _check_rebuilds(model: nn.Module, config: dict) -> None:
    """The saved config must rebuild a model with the same tensor names and shapes (built on meta)."""
    try:
        with torch.device("meta"):
            twin = type(model)(**config)
    except Exception as e:
        raise ValueError(f"cannot save {type(model).__name__}: its recorded constructor arguments {config} "
                         f"do not rebuild it ({type(e).__name__}: {e})") from e
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    if want != got:
        raise ValueError(f"cannot save {type(model).__name__}: its constructor arguments {config} rebuild a "
                         f"model with other tensors ({got}) than it has ({want})")


def _read(path: str, device) -> tuple[dict, dict]:
    """All tensors and the parsed fastff metadata of ``path``; checksums verified."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: '{path}'")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise ValueError(f"cannot read '{path}': not a valid safetensors file ({type(e).__name__}: {e})") from e
    if "fastff" not in header:
        raise ValueError(f"'{path}' has no fastff metadata: it was not written by fastff.save "
                         f"(a plain state dict can be read with safetensors.torch.load_file)")
    if header.get("fastff_sha256") != _text_digest(header["fastff"]):
        raise ValueError(f"'{path}' is corrupted: checksum mismatch in the fastff metadata")
    try:
        meta = json.loads(header["fastff"])
        digests, aliases, records, root = meta["sha256"], meta["aliases"], meta["layers"], meta["root"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"'{path}' has corrupted fastff metadata ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{path}' has fastff format {meta.get('format')!r}; this version reads {FORMAT}")
    if set(digests) != set(tensors):
        raise ValueError(f"'{path}' is corrupted: stored tensors {sorted(tensors)} differ from the "
                         f"recorded ones {sorted(digests)}")
    bad = [k for k, t in tensors.items() if _digest(t) != digests[k]]
    if bad:
        raise ValueError(f"'{path}' is corrupted: checksum mismatch in tensor(s) {bad}")
    # fresh storage: the file's tensors sit at arbitrary byte offsets, and kernels (BLAS) may
    # round differently on misaligned weights, so a reload would not compute the same bits
    tensors = {k: t.to(device, copy=True) for k, t in tensors.items()}
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors, {"layers": records, "root": root}


def _mismatches(model: nn.Module, tensors: dict, records: dict, dtypes: bool) -> list[str]:
    """Every difference between the file and ``model``: layer classes / configs, tensor names,
    shapes and (if ``dtypes``) dtypes."""
    problems = []
    own = _layer_records(model)
    for path in sorted(set(own) | set(records)):
        where = f"layer '{path}'" if path else "the model"
        if path not in own:
            problems.append(f"{where}: file has a {records[path]['class']}, model has none")
        elif path not in records:
            problems.append(f"{where}: model has a {own[path]['class']}, file has none")
        elif own[path]["class"] != records[path]["class"]:
            problems.append(f"{where}: file has a {records[path]['class']}, model a {own[path]['class']}")
        else:
            # an argument added to the class after the file was written reads as its default there
            a = _defaults(_registry()[own[path]["class"]]) | records[path]["config"]
            b = own[path]["config"]
            diffs = [f"{k}: file {a.get(k)!r}, model {b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k, "<absent>") != b.get(k, "<absent>")]
            if diffs:
                problems.append(f"{where} ({own[path]['class']}): " + ", ".join(diffs))
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing:
        problems.append(f"tensors missing from the file: {missing}")
    if unexpected:
        problems.append(f"tensors in the file that the model does not have: {unexpected}")
    for k in sorted(set(state) & set(tensors)):
        t, v = tensors[k], state[k]
        if t.shape != v.shape:
            problems.append(f"tensor '{k}': file shape {tuple(t.shape)}, model {tuple(v.shape)}")
        elif dtypes and t.dtype != v.dtype:
            problems.append(f"tensor '{k}': file dtype {t.dtype}, model {v.dtype} (convert the model first)")
    return problems


def load(path: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Read a file written by ``save``. Without ``model``: rebuild the saved (serializable) model
    on ``device`` and return it in eval mode. With ``model``: check that it matches the file,
    then copy the weights into it (on its own device) and return it."""
    path = os.fspath(path)
    tensors, meta = _read(path, device if model is None else "cpu")
    if model is None:
        root = meta["root"]
        cls = _registry().get(root.get("class"))
        if cls is None or "config" not in root:
            raise ValueError(f"'{path}' holds a {root.get('class')}, which fastff cannot rebuild by itself; "
                             f"build the same model and pass it: fastff.load(path, model=model)")
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG stream
            with torch.device(device):
                model = cls(**root["config"])
        assign, model = True, model.eval()
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    else:
        assign = False
    problems = _mismatches(model, tensors, meta["layers"], dtypes=not assign)
    if problems:
        raise ValueError(f"cannot load '{path}' into {type(model).__name__}: the file was written for "
                         f"another model: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=True, assign=assign)
    return model
