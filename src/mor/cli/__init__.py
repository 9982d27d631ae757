"""The ``mor`` command: one module per command group, the options they share in :mod:`mor.cli.common`.

A command module defines ``register(subparsers)``, which adds its subcommands and sets each one's ``func`` (a
handler taking the parsed arguments and returning the exit status); listing the module in ``COMMAND_MODULES``
makes its commands part of ``mor``. Handlers raise errors rather than print them: :func:`main` hands every one to
:func:`mor.errors.report_error`, which prints it as one line and chooses the exit status (2 bad input, 1 a failed
run or a bug). Registering imports no torch, numpy or tokenizers (handlers import what they
need when they run), so ``mor --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mor.errors import report_error, split_debug_flag

COMMAND_MODULES = (
    "mor.cli.info",
    "mor.cli.data",
    "mor.cli.train",
    "mor.cli.eval",
    "mor.cli.generate",
    "mor.cli.convert",
    "mor.cli.viz",
    "mor.cli.serve",
    "mor.cli.quickstart",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor", description="Mixture-of-Recursions language models")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
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
