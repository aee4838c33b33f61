"""English sentences from a local text source, for calibrating and evaluating sentence encoders:
Debian ``fortunes`` by default (``/usr/share/games/fortunes``), or any text file / directory."""
from __future__ import annotations

import random
import re
from pathlib import Path

DEFAULT_TEXT = Path("/usr/share/games/fortunes")


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def load_sentences(path: str | Path | None = None, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Unique English-looking sentences from a text file or a directory of them, in file order.

    Fortune-format files (records separated by ``%`` lines, ``-- Author`` attributions) are
    handled; ``.dat``/``.u8`` index files are skipped.
    """
    path = Path(DEFAULT_TEXT if path is None else path)
    if not path.exists():
        raise FileNotFoundError(f"text source {path} not found: pass --text FILE_OR_DIR "
                                "(or install the Debian package 'fortunes' for the default)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in (".dat", ".u8")) \
        if path.is_dir() else [path]
    seen, out = set(), []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        for record in re.split(r"^%\s*$", text, flags=re.M):
            lines = [ln for ln in record.splitlines() if not ln.strip().startswith("--")]
            for sent in _SENT.split(" ".join(" ".join(lines).split())):
                words = sent.split()
                letters = sum(ch.isalpha() or ch == " " for ch in sent)
                key = sent.lower()
                if min_words <= len(words) <= max_words and letters >= 0.85 * len(sent) and key not in seen:
                    seen.add(key)
                    out.append(sent)
    return out


def split_sentences(sentences: list[str], n_calib: int, n_eval: int, seed: int = 0):
    """Disjoint (calibration, evaluation) lists drawn after a seeded shuffle of unique sentences."""
    if n_calib + n_eval > len(sentences):
        raise ValueError(f"n_calib + n_eval must be <= {len(sentences)} available sentences, got {n_calib + n_eval}")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    pick = [sentences[i] for i in order]
    return pick[n_eval:n_eval + n_calib], pick[:n_eval]
