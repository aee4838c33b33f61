"""fastff.progress: bars that do not flood a log file."""
import io
import itertools
import time

from fastff.progress import NON_TTY_INTERVAL, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _redraws(stream, seconds_per_clock_read=0.01, **kwargs) -> tuple[int, float]:
    """(redraws written, simulated seconds) of a bar over a fast loop of 20000 steps whose clock
    advances ``seconds_per_clock_read`` each time tqdm reads it."""
    clock = itertools.count()
    bar = progress(range(20000), file=stream, desc="loop", **kwargs)
    start = time.time()
    bar._time = lambda: start + next(clock) * seconds_per_clock_read
    for _ in bar:
        pass
    return stream.getvalue().count("\r"), next(clock) * seconds_per_clock_read


def test_a_log_file_gets_a_redraw_every_few_seconds_only():
    redraws, seconds = _redraws(io.StringIO())
    assert seconds > 10 * NON_TTY_INTERVAL                    # long enough to redraw many times
    assert 2 <= redraws <= seconds / NON_TTY_INTERVAL + 3
    terminal, _ = _redraws(Terminal())                         # a terminal keeps tqdm's live redraws
    assert terminal > 100


def test_disabled_bar_and_explicit_interval():
    silent = io.StringIO()
    assert list(progress(range(5), file=silent, disable=True)) == list(range(5))
    assert silent.getvalue() == ""
    assert progress(range(5), file=io.StringIO(), mininterval=0.5).mininterval == 0.5
    assert progress(range(5), file=io.StringIO()).mininterval == NON_TTY_INTERVAL
    assert progress(range(5), file=Terminal()).mininterval < NON_TTY_INTERVAL
