"""Human-labelled text for sentence encoders, read in place from the test data the PyPI package
``gensim`` ships (``gensim/test/test_data``; extra ``models``):

- the Lee corpus (Lee, Pincombe & Welsh 2005): ``lee.cor``, 50 news documents, one per line,
  Latin-1; ``similarities0-1.txt``, a 50x50 matrix of mean human similarity ratings in [0, 1]
  whose upper triangle holds the 1,225 document pairs (the lower triangle is zero);
- ``pang_lee_polarity.cor``: 200 movie-review sentences (Pang & Lee), one per line,
  ``__label__pos`` / ``__label__neg`` then the lower-cased, tokenised text, Windows-1252.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .datasets import DataFormatError

__all__ = ["gensim_test_data", "lee_corpus", "polarity_sentences"]

POLARITY_LABELS = {"__label__neg": 0, "__label__pos": 1}


def gensim_test_data() -> Path:
    """The ``test/test_data`` directory of the installed ``gensim`` package (located, not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ImportError("human-label evaluation needs the 'models' extra: pip install gensim==4.4.0")
    return Path(spec.origin).parent / "test" / "test_data"


def lee_corpus(root: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """(50 documents, human similarity (1225,) of the pairs ``np.triu_indices(50, 1)``) from
    ``lee.cor`` and ``similarities0-1.txt`` in ``root`` (default ``gensim_test_data()``)."""
    root = Path(root) if root is not None else gensim_test_data()
    docs = [line.strip() for line in (root / "lee.cor").read_bytes().decode("latin-1").splitlines() if line.strip()]
    sims = np.loadtxt(root / "similarities0-1.txt", ndmin=2)
    n = len(docs)
    if sims.shape != (n, n):
        raise DataFormatError(f"{root / 'similarities0-1.txt'}: expected a {n}x{n} matrix for the {n} documents "
                              f"of lee.cor, got shape {sims.shape}")
    if np.tril(sims, -1).any() or not np.allclose(np.diag(sims), 1):
        raise DataFormatError(f"{root / 'similarities0-1.txt'}: expected an upper-triangular matrix with ones on "
                              "the diagonal")
    return docs, sims[np.triu_indices(n, 1)]


def polarity_sentences(root: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """(sentences, labels (n,) int: 1 positive, 0 negative) from ``pang_lee_polarity.cor`` in
    ``root`` (default ``gensim_test_data()``)."""
    path = (Path(root) if root is not None else gensim_test_data()) / "pang_lee_polarity.cor"
    sentences, labels = [], []
    for i, line in enumerate(path.read_bytes().decode("cp1252").splitlines(), 1):
        label, _, text = line.strip().partition(" ")
        if label not in POLARITY_LABELS or not text.strip():
            raise DataFormatError(f"{path}:{i}: expected '__label__pos' or '__label__neg' and a sentence, "
                                  f"got {line[:60]!r}")
        sentences.append(text.strip())
        labels.append(POLARITY_LABELS[label])
    return sentences, np.array(labels)
