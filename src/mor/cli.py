"""The ``mor`` command. Each subsystem registers its own subcommands through ``register(subparsers)``.

Registering imports no torch, numpy or tokenizers (subcommands import what they need when they run), so
``mor --help`` and argument errors answer at once. The options several subcommands share are defined here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from mor.config import parse_assignment
from mor.errors import report_error, split_debug_flag

# Modules that define ``register(subparsers)``; a missing optional dependency only hides its commands.
COMMAND_MODULES = (
    "mor.model.cli",
    "mor.data.cli",
    "mor.train.cli",
    "mor.eval.cli",
    "mor.infer.cli",
    "mor.interop.cli",
    "mor.viz.cli",
    "mor.serve.cli",
    "mor.quickstart",
)


class SetAction(argparse.Action):
    """``--set KEY=VALUE``: repeatable, and one ``--set`` may take several pairs. Each pair is checked while
    parsing, so that a mistake is reported under the subcommand's usage."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        values = [values] if isinstance(values, str) else list(values or [])
        for text in values:
            try:
                parse_assignment(text)
            except ValueError as error:
                hint = "" if "=" in text else " (give positional arguments before --set)"
                parser.error(f"--set: {error}{hint}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The one ``--set`` option: ``args.overrides`` is the list of ``KEY=VALUE`` strings in the order given."""
    parser.add_argument("--set", dest="overrides", action=SetAction, nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"{help}; values are parsed as YAML; repeat --set or give several pairs after one")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default auto: cuda when available)")


def resolve_device(name: str) -> str:
    """``auto`` is ``cuda`` when a GPU is available, else ``cpu``."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor", description="Mixture-of-Recursions language models")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and (error.name == name or name.startswith(error.name + ".")):
                continue  # that subsystem is not part of this installation
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while they wait stall every step when another process holds one of the cores. On
    # 2 cores (benchmarks/cpu_threads.py) passive waiting made quickstart steps 2.6x faster beside one busy
    # process and 1.4x slower on an idle machine: a bounded cost against runs that took 10 times as long on a
    # shared machine. Set before torch is imported, unless the environment chose.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv, debug = split_debug_flag(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line, not a traceback (see mor.errors)
        return report_error(error, debug)


if __name__ == "__main__":
    sys.exit(main())
