"""lm-evaluation-harness's command line with the ``mor`` model registered.

lm-eval 0.4 finds models only in its own registry (it has no plugin entry points), so the adapter module must
be imported before its CLI parses ``--model mor``. ``mor lm-eval ARGS`` and ``python -m mor.eval.harness ARGS``
both do that, then hand ``ARGS`` to lm-eval unchanged.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        import mor.eval.lm_eval_adapter  # noqa: F401  (registers the model "mor")
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "lm_eval":
            print("lm-evaluation-harness is not installed: pip install 'mor[eval]' (or 'lm-eval>=0.4,<0.5')",
                  file=sys.stderr)
            return 1
        raise
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse exits; report its status as ours
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
