"""`fastff <command>`: each command lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int | None``; modules are imported lazily."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "bench": ("fastff.bench", "time FFF / NeuronTree inference against dense and MoE baselines"),
    "demo": ("fastff.experiments.demo", "train Dense / FFF / NeuronTree on digits and print a comparison"),
    "convert-minilm": ("fastff.models.minilm", "carve + distil FFF feedforwards into all-MiniLM-L6-v2; quality and speed report"),
    "train": ("fastff.training.cli_train", "train one FF / FFF / NeuronTree / MoE model (selected on validation)"),
    "report": ("fastff.report", "markdown tables and PNG plots from run directories"),
    "experiment": ("fastff.experiments.cli", "run a whole experiment grid (table1, ablation, moe, vit, recipe) and its report"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastff", description="fast feedforward networks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in argv:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
