"""How the ``mor`` command reports a failure: one line that names the problem and the fix, never a traceback.

mor's own errors for bad input (a config, data, a checkpoint, a path) carry the fix in their message; failures
of the operating system (no permission, a full disk, a path under a file) get a plain reason here. Any other
exception is a bug in mor and is reported as one, still in one line. ``--debug`` anywhere on the command line,
or ``MOR_DEBUG=1``, shows the traceback instead.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback

from mor.outputs import os_error_text

DEBUG_FLAG = "--debug"
PASSTHROUGH_COMMANDS = ("lm-eval",)  # their arguments belong to another program


def split_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether a traceback was asked for (``--debug`` or ``MOR_DEBUG=1``)."""
    debug = os.environ.get("MOR_DEBUG", "") not in ("", "0")
    command = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    end = command + 1 if command < len(argv) and argv[command] in PASSTHROUGH_COMMANDS else len(argv)
    kept = [arg for i, arg in enumerate(argv) if not (i < end and arg == DEBUG_FLAG)]
    return kept, debug or len(kept) < len(argv)


def report_error(error: Exception, debug: bool) -> int:
    """Print ``error`` as one line on stderr (a traceback with ``debug``) and return the exit status, 1."""
    if debug:
        traceback.print_exception(error)
    else:
        print(f"error: {describe(error)}", file=sys.stderr)
    return 1


def describe(error: BaseException) -> str:
    """One line that says what went wrong and, where mor knows it, what to do."""
    message = " ".join(str(error).split())
    if isinstance(error, OSError):
        if error.filename is None:  # raised by mor, with its own message (e.g. FileNotFoundError "give ...")
            return message
        reason, fix = os_error_text(error)
        return f"cannot use {error.filename}: {reason}; {fix}"
    if isinstance(error, pickle.UnpicklingError):
        return ("a file is not a safe checkpoint: it holds Python objects other than tensors, which could run code "
                "when loaded, so it was refused; use a file from a source you trust")
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return ("out of memory; use a smaller batch (batch.micro_batch_size, --batch-size) or sequence length, or "
                "a machine with more memory")
    if isinstance(error, ModuleNotFoundError) and "pip install" not in message:
        return f"{message}; install the package that provides it (pip install 'mor[all]' brings every optional one)"
    if isinstance(error, (ValueError, ImportError)) or _is_yaml_error(error):
        return message or type(error).__name__
    return (f"internal error ({type(error).__name__}: {message}); this is a bug in mor: run again with --debug "
            "(or MOR_DEBUG=1) for the traceback and report it")


def _is_yaml_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("yaml")
