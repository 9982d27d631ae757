"""``mor eval`` (perplexity and zero/few-shot tasks) and ``mor lm-eval`` (lm-evaluation-harness with model "mor")."""

from __future__ import annotations

import argparse
import platform
import sys
from itertools import islice
from pathlib import Path

from mor.cli.common import (CHECKPOINT_HELP, add_checkpoint_arguments, add_routing_argument, load_model,
                            non_negative_int, positive_int, routing_modes)
from mor.eval.task_data import TASKS, data_source, load_docs, resolve_tasks


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity and zero/few-shot accuracy of a checkpoint",
        description="Evaluate a checkpoint: validation NLL/perplexity over packed rows of held-out text and "
                    "zero/few-shot tasks with the paper's metrics. Expert-choice MoR models are scored in both "
                    "routing modes unless --routing says otherwise.")
    add_checkpoint_arguments(parser, CHECKPOINT_HELP + "; with --transformers, a Hugging Face folder or a .gguf file")
    parser.add_argument("--tasks", default="", help=f"comma-separated tasks or groups 'paper', 'all'; tasks: "
                                                    f"{', '.join(TASKS)}")
    parser.add_argument("--limit", type=positive_int, help="score only the first N items of each task")
    parser.add_argument("--num-fewshot", type=non_negative_int, default=0, help="demonstrations per item (default 0)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws (default 1234)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward (default 8)")
    add_routing_argument(parser)
    parser.add_argument("--perplexity", action="append", default=[], metavar="SOURCE",
                        help="held-out text for NLL/perplexity: a .txt file (one document), .jsonl[.xz|.gz] "
                             "(field 'text') or a folder prepared by `mor data prepare` (its val split); repeatable")
    parser.add_argument("--perplexity-rows", type=positive_int, default=500,
                        help="rows to score per source (default 500)")
    parser.add_argument("--seq-len", type=positive_int,
                        help="tokens per perplexity row (default: min(2048, the model's max_position_embeddings))")
    parser.add_argument("--max-length", type=positive_int,
                        help="context window for task scoring; longer inputs lose tokens from the left (default: "
                             "max_position_embeddings)")
    parser.add_argument("--data-dir", type=Path,
                        help="read the tasks from DIR/eval/*.jsonl instead of the Hugging Face Hub (default: "
                             "$MOR_DATA_DIR; unset: each task's Hub dataset, read with datasets, which caches it "
                             "for offline runs)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--transformers", action="store_true",
                        help="load CHECKPOINT (a Hugging Face folder or a .gguf file) with "
                             "transformers.AutoModelForCausalLM: reference numbers of an original model under "
                             "the same protocol")
    parser.set_defaults(func=run_eval)

    # prefix_chars="+": every "-..." argument is lm-eval's, passed through untouched.
    harness = subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="+",
        help="lm-evaluation-harness with the model 'mor': mor lm-eval --model mor --model_args pretrained=CKPT "
             "--tasks hellaswag (--help: more)")
    harness.add_argument("harness_args", nargs=argparse.REMAINDER)
    harness.set_defaults(func=run_harness)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from mor.eval.perplexity import evaluate_perplexity, source_rows
    from mor.eval.results import Metric, markdown_table, write_json
    from mor.eval.tasks import evaluate_task
    from mor.outputs import writable_file

    if not args.tasks and not args.perplexity:
        raise ValueError("nothing to evaluate; pass --tasks (e.g. --tasks paper) and/or --perplexity FILE")
    # Read every input, and check the output, before the first forward pass: bad input fails in seconds, not
    # after hours.
    if args.out:
        writable_file(args.out, "--out")
    tasks = resolve_tasks(args.tasks) if args.tasks else []
    model, tokenizer = load_model(args, backend="transformers" if args.transformers else "mor")
    context = model.config.max_position_embeddings
    for name in ("seq_len", "max_length"):
        if (getattr(args, name) or 0) > context:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} exceeds the model's context "
                             f"(max_position_embeddings {context}); use at most {context}")
    seq_len = args.seq_len or min(2048, context)
    rows = {source: list(islice(source_rows(source, tokenizer, seq_len, model.config.vocab_size),
                                args.perplexity_rows)) for source in args.perplexity}
    docs = {task.name: load_docs(task, args.data_dir) for task in tasks}
    modes = routing_modes(model, args.routing)

    metrics: list[Metric] = []
    for source, packed in rows.items():
        for routing in modes:
            result = evaluate_perplexity(model, packed, num_rows=None, batch_size=args.batch_size,
                                         routing=routing, source=Path(source).name)
            metrics.extend(result.metrics())
    for task in tasks:
        for routing in modes:
            metrics.extend(evaluate_task(model, tokenizer.backend, task, routing=routing, limit=args.limit,
                                         num_fewshot=args.num_fewshot, seed=args.seed, batch_size=args.batch_size,
                                         max_length=args.max_length, docs=docs[task.name]))

    print(markdown_table(metrics))
    if args.out:
        write_json(args.out, metrics, checkpoint=str(args.checkpoint), tokenizer=str(tokenizer.path),
                   settings={**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                if k not in ("func", "command")},
                             "seq_len": seq_len, "max_length": args.max_length or model.config.max_position_embeddings},
                   task_sources={task.name: data_source(task, args.data_dir) for task in tasks},
                   model_config=model.config.to_dict(),
                   environment={"torch": torch.__version__, "python": platform.python_version()})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def run_harness(args: argparse.Namespace) -> int:
    from mor.eval.harness import main

    return main(args.harness_args)
