"""`fastff <command>`: each command lives in its own module of ``fastff.apps`` exposing
``add_arguments(parser)`` and ``run(args) -> int | None``; modules are imported lazily."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

COMMANDS = {
    "demo": ("fastff.apps.demo", "train Dense / FFF / NeuronTree on digits and print a comparison"),
    "train": ("fastff.apps.train", "train one FF / FFF / NeuronTree / MoE model (selected on validation)"),
    "experiment": ("fastff.apps.experiment", "run a whole experiment grid (table1, ablation, moe, vit, recipe, frontier, lm) and its report"),
    "report": ("fastff.apps.report", "markdown tables and PNG plots from run directories"),
    "bench": ("fastff.apps.bench", "time FFF / NeuronTree inference against dense and MoE baselines"),
    "train-bench": ("fastff.apps.train_bench", "time training steps (forward + backward + optimiser) against dense"),
    "convert-minilm": ("fastff.apps.convert_minilm", "carve + distil FFF feedforwards into all-MiniLM-L6-v2; quality and speed report"),
    "lm": ("fastff.apps.lm", "character-level GPT with dense or tree feedforwards: train, generate, bench"),
}
# `fastff experiment lm ...` is `fastff lm experiment ...` (the language-model grid has its own command
# group, with train / generate / bench)
ALIASES = {("experiment", "lm"): ["lm", "experiment"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastff", description="fast feedforward networks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    argv = sys.argv[1:] if argv is None else argv
    argv = ALIASES.get(tuple(argv[:2]), argv[:2]) + argv[2:]
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in argv:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    args.command_line = "fastff " + shlex.join(argv)   # for reports: the command that made them
    return importlib.import_module(args._module).run(args) or 0


def console() -> int:
    """The ``fastff`` executable: ``main`` with bad input (``ValueError``, ``FileNotFoundError``: the
    library's messages say what to change) printed as one line, exit status 2; a training run
    stopped by SIGINT / SIGTERM (checkpoint written) as one line, exit status 128 + the signal;
    other errors keep their traceback."""
    from ..training.run import Interrupted

    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        print(f"fastff: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"fastff: {e}", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(console())
