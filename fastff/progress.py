"""The one progress bar of the library and its commands: tqdm, quiet when logged to a file."""
from __future__ import annotations

import sys

from tqdm import autonotebook, std
from tqdm.auto import tqdm

# Seconds between redraws when the bar does not write to a terminal (a log file or a pipe):
# a bar redrawn ~10 times a second floods a log with thousands of lines.
NON_TTY_INTERVAL = 5.0


def progress(iterable=None, **tqdm_kwargs) -> tqdm:
    """``tqdm(iterable, **tqdm_kwargs)`` (``tqdm.auto``: a widget in notebooks); a text bar whose
    ``file`` (default ``sys.stderr``) is not a terminal redraws at most every ``NON_TTY_INTERVAL``
    seconds unless ``mininterval`` is given. ``disable=True`` gives a silent bar, as in tqdm."""
    stream = tqdm_kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if autonotebook.tqdm is std.tqdm and not (isatty is not None and isatty()):
        tqdm_kwargs.setdefault("mininterval", NON_TTY_INTERVAL)
    return tqdm(iterable, **tqdm_kwargs)
