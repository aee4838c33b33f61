"""`fastff <command>`: each command lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int | None``; modules are imported lazily."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("fastff.experiments.demo", "train Dense / FFF / NeuronTree on digits and print a comparison"),
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
