"""Command-line options every command declares the same way: ``--threads``, ``--device``, the run directory
flags (``--out``, ``--resume``, ``--overwrite``) and the feedforward family with its options,
generated from the family registry (``fastff.layers.families``)."""
from __future__ import annotations

import argparse

import torch

from ..layers.families import FAMILIES, family
from ..threads import set_threads


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch and numba threads (default: torch's own count, normally one per core)")


def apply_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (if given); ValueError for a count below 1."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}; leave it out to use torch's default")
    set_threads(n)


def add_device(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument("--device", default=default, help=f"cpu or cuda[:N] (default {default})")


def check_device(name: str) -> torch.device:
    """``--device``: ``cpu`` or an available ``cuda[:N]``; ValueError saying what to change otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False); "
                             f"use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (created before training; must not hold a run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its checkpoint (same options)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")


PREFIX = "ffn_option_"   # argparse destination of a family option's flag


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_ffn_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` flag per option name of the registered families (default: none given, so
    the family's or the command's default applies); the help says which families take it.
    ``skip``: option names the command sets itself (e.g. ``fastff bench --depth``)."""
    seen: dict[str, list] = {}
    for fam in FAMILIES.values():
        for o in fam.options:
            if o.name not in skip:
                seen.setdefault(o.name, []).append((fam, o))
    for name, uses in seen.items():
        o = uses[0][1]
        # families sharing an option name may mean different things by it: one help per meaning,
        # every family's values allowed (the family itself refuses a value that is not its own)
        meanings: dict[tuple, list[str]] = {}
        for f, u in uses:
            meanings.setdefault((u.help, u.default), []).append(f.name)
        help_text = "; ".join(f"[{', '.join(owners)}] {h}" + ("" if d is None else f" (default {d})")
                              for (h, d), owners in meanings.items())
        kwargs = dict(default=None, dest=f"{PREFIX}{name}", help=help_text)
        if o.type is bool:
            p.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            choices = None if any(u.choices is None for _, u in uses) else list(dict.fromkeys(
                c for _, u in uses for c in u.choices))
            p.add_argument(_flag(name), type=o.type, choices=choices, **kwargs)


def given_ffn_options(args: argparse.Namespace) -> dict:
    """The feedforward options given on the command line: {option name: value}."""
    return {k.removeprefix(PREFIX): v for k, v in vars(args).items() if k.startswith(PREFIX) and v is not None}


def ffn_options(args: argparse.Namespace, name: str, strict: bool = True) -> dict:
    """The options given for family ``name``; ``strict``: an option the family does not take is
    an error naming the flags it does take (otherwise it is left out, for commands that build
    several families from one command line)."""
    fam = family(name)
    given = given_ffn_options(args)
    foreign = sorted(k for k in given if fam.option(k) is None)
    if strict and foreign:
        takes = ", ".join(_flag(o.name) for o in fam.options) or "none"
        raise ValueError(f"{', '.join(map(_flag, foreign))} do(es) not apply to --ffn {fam.name}; "
                         f"{fam.name} takes {takes}")
    return {k: v for k, v in given.items() if fam.option(k) is not None}
