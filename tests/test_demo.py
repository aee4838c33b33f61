"""`fastff demo --quick` end to end: the comparison table, and a progress bar that does not flood
a log file (stderr captured here is not a terminal)."""
from __future__ import annotations

from fastff.apps.cli import main


def test_quick_demo_prints_the_table_and_a_quiet_log(capsys):
    assert main(["demo", "--quick"]) == 0
    out, err = capsys.readouterr()
    for name in ("DenseFF w=128", "FFF d=4 l=8", "NeuronTree 1x6", "MoE 8x16 top-1", "At scale"):
        assert name in out
    redraws = err.count("\r") + err.count("\n")
    assert redraws < 10, err    # a redraw every few seconds at most, not one per epoch or postfix update
