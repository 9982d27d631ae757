"""The ``mor`` command. Each subsystem registers its own subcommands through ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

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
    "mor.quickstart",
)


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
