"""lm-evaluation-harness's command line with the ``mor`` model registered.

lm-eval 0.4 finds models only in its own registry (it has no plugin entry points), so the adapter module must
be imported before its CLI parses ``--model mor``. ``mor lm-eval ARGS`` and ``python -m mor.eval.harness ARGS``
both do that, then hand ``ARGS`` to lm-eval, with ``--device`` added when it is not given: lm-eval's own default,
``cuda:0``, fails on machines without a GPU.
"""

from __future__ import annotations

import sys

USAGE = """\
mor lm-eval: lm-evaluation-harness's command line with the model 'mor' registered; every argument goes to lm-eval.
Score a mor checkpoint with --model mor:

  mor lm-eval --model mor --model_args pretrained=CHECKPOINT --tasks hellaswag,piqa --limit 100

--model_args of 'mor' (comma-separated): pretrained (checkpoint folder), tokenizer (default: the checkpoint's),
routing=topk|causal, dtype=auto|float32|bfloat16, max_length. --device defaults to cuda when there is a GPU,
else cpu. lm-eval downloads each task's data from the Hugging Face Hub into the datasets cache.
lm-eval's own help follows.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import mor.eval.lm_eval_adapter  # noqa: F401  (registers the model "mor")
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "lm_eval":
            print("lm-evaluation-harness is not installed: pip install 'mor[eval]' (or 'lm-eval>=0.4,<0.5')",
                  file=sys.stderr)
            return 1
        raise
    if {"-h", "--help"} & set(argv):
        print(USAGE)
    sys.argv = ["lm-eval", *with_device(argv)]
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse exits; report its status as ours
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except ConnectionError as error:  # a task's dataset, neither reachable nor cached
        print(f"mor lm-eval: {error}. lm-eval's tasks download their data from the Hugging Face Hub with datasets: "
              "run once online; later runs read the cache, also offline with HF_DATASETS_OFFLINE=1", file=sys.stderr)
        return 1
    return 0


def with_device(argv: list[str]) -> list[str]:
    """``argv`` with ``--device`` of the machine's device added, unless it names one (or a config file may)."""
    if any(arg in ("--device", "--config", "-C") or arg.startswith(("--device=", "--config=")) for arg in argv):
        return argv
    import torch

    return [*argv, "--device", "cuda" if torch.cuda.is_available() else "cpu"]


if __name__ == "__main__":
    sys.exit(main())
