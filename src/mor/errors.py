"""How the ``mor`` command reports a failure: one line that names the problem and the fix, never a traceback.

Command handlers do not catch errors: every exception reaches :func:`report_error` (hooked in ``mor.cli.main``),
which prints ``error: <one line>`` on stderr and returns the exit status:

* **2, bad input**: what the user gave is wrong and the line says what to give instead: a ``ValueError`` (mor's
  ``ConfigError``, ``DataError``, ``CheckpointError``, ``OutputError``... are ValueErrors), a ``FileNotFoundError``
  raised by mor (it names the path and what to give), an ``ImportError`` (a missing optional package), a YAML
  error, a file that is not a safe checkpoint (an unpickling error). Usage errors of argparse exit 2 too.
* **1, the run failed**: the system refused it (no permission, a full disk, a read-only file system: the path, a
  reason and a fix, from :data:`mor.outputs.OS_ERRORS`), it ran out of memory, training diverged, or mor has a
  bug (any other exception, reported as one).

A command that finds a problem and reports it as its result (``mor data inspect --verify`` naming damaged files)
prints it itself and returns 1. ``--debug`` anywhere on the command line, or ``MOR_DEBUG=1``, shows the traceback
instead of the line.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import traceback

from mor.outputs import os_error_text

DEBUG_FLAG = "--debug"
PASSTHROUGH_COMMANDS = ("lm-eval",)  # their arguments belong to another program
BAD_INPUT = 2
RUN_FAILED = 1
# Failures of a run whose message names the cause and the fix (e.g. a diverged run: the step and the last good
# checkpoint). Named, not imported: their modules import torch, and are loaded by the commands that raise them.
_RUN_FAILURES = (("mor.train.trainer", "TrainingDiverged"),)
# The parts of a YAML error message after its first line: where the problem is, and the source line with a caret.
_YAML_MARK = re.compile(r'^\s*in "(?P<name>[^"]*)", line (?P<line>\d+), column (?P<column>\d+):?\s*$')
_CARET = re.compile(r"^\s*\^\s*$")


def split_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether a traceback was asked for (``--debug`` or ``MOR_DEBUG=1``)."""
    debug = os.environ.get("MOR_DEBUG", "") not in ("", "0")
    command = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    end = command + 1 if command < len(argv) and argv[command] in PASSTHROUGH_COMMANDS else len(argv)
    kept = [arg for i, arg in enumerate(argv) if not (i < end and arg == DEBUG_FLAG)]
    return kept, debug or len(kept) < len(argv)


def report_error(error: Exception, debug: bool) -> int:
    """Print ``error`` as one line on stderr (a traceback with ``debug``) and return its exit status
    (:func:`exit_status`)."""
    if debug:
        traceback.print_exception(error)
    else:
        print(f"error: {describe(error)}", file=sys.stderr)
    return exit_status(error)


def exit_status(error: BaseException) -> int:
    """2 for bad input (fix what was given and run again), 1 for a run that failed or a bug in mor."""
    if isinstance(error, FileNotFoundError):  # mor's own name the path and what to give; the system's are failures
        return BAD_INPUT if error.filename is None else RUN_FAILED
    if isinstance(error, (ValueError, ImportError, pickle.UnpicklingError)) or _is_yaml_error(error):
        return BAD_INPUT
    return RUN_FAILED


def describe(error: BaseException) -> str:
    """One line that says what went wrong and, where mor knows it, what to do."""
    message = one_line(str(error))
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
    if isinstance(error, (ValueError, ImportError)) or _is_yaml_error(error) or _is_run_failure(error):
        return message or type(error).__name__
    return (f"internal error ({type(error).__name__}: {message}); this is a bug in mor: run again with --debug "
            "(or MOR_DEBUG=1) for the traceback and report it")


def one_line(message: str) -> str:
    """``message`` on one line. A YAML error's location lines (``in "FILE", line 3, column 6:`` with the quoted
    source and a caret under it) become "at line 3, column 6", and the line ends with where to correct the YAML."""
    lines = message.splitlines()
    carets = {i for i, line in enumerate(lines) if _CARET.match(line)}
    quoted = {i - 1 for i in carets if i > 0 and not _YAML_MARK.match(lines[i - 1])}
    parts, marks = [], []
    for i, line in enumerate(lines):
        if i in carets or i in quoted:
            continue
        mark = _YAML_MARK.match(line)
        if mark is None:
            parts.append(line)
            continue
        marks.append(f"line {mark['line']}, column {mark['column']}")
        # "<unicode string>" (YAML read from a string) names no file; a file named before is not named again.
        named = mark["name"].startswith("<") or mark["name"] in message.split(line)[0]
        parts.append(f"at {marks[-1]}{'' if named else ' of ' + mark['name']}:")
    text = " ".join(" ".join(parts).split()).rstrip(":")
    if not marks:
        return text
    return f"{text}; correct the YAML {'there' if len(marks) == 1 else 'at ' + marks[-1]}"


def _is_yaml_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("yaml")


def _is_run_failure(error: BaseException) -> bool:
    for module, name in _RUN_FAILURES:
        failure = getattr(sys.modules.get(module), name, None)
        if isinstance(failure, type) and isinstance(error, failure):
            return True
    return False
