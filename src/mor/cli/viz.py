"""``mor viz``: routing analysis of a checkpoint and plots of runs and benchmarks.

    mor viz depth CHECKPOINT --text "..." --out DIR      tokens coloured by recursion depth (HTML + PNG)
    mor viz stats CHECKPOINT --data FILE --out DIR       tokens per depth, router metrics, depth scaling
    mor viz runs RUN_DIR... --out DIR                    loss curves, NLL against FLOPs
    mor viz bench JSON... --out DIR                      throughput against NLL

Plotting modules are imported inside the handlers, so ``mor`` works without matplotlib installed (``mor viz``
then says how to install it).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from mor.cli.common import add_checkpoint_arguments, add_routing_argument, load_model, positive_int, routing_modes
from mor.outputs import writable_folder

INSTALL_HINT = "mor viz needs matplotlib: pip install 'mor[viz]' (or pip install matplotlib)"


def register(subparsers: argparse._SubParsersAction) -> None:
    viz = subparsers.add_parser("viz", help="routing analysis and plots of runs and benchmarks",
                                description="Routing analysis of a checkpoint and plots of runs and benchmarks.")
    commands = viz.add_subparsers(dest="viz_command", metavar="SUBCOMMAND")
    viz.set_defaults(func=lambda args: _usage(viz))

    depth = commands.add_parser("depth", help="tokens of a text coloured by recursion depth (HTML + PNG)",
                                description="Run a checkpoint on a text and write depth.html, depth.png and "
                                            "depth.json: every token coloured by the recursion steps it ran.")
    _checkpoint_args(depth)
    text = depth.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to analyse")
    text.add_argument("--text-file", type=Path, help="read the text from this file (UTF-8)")
    depth.set_defaults(func=run_depth)

    stats = commands.add_parser("stats", help="tokens per depth, router metrics and depth scaling on a corpus sample",
                                description="Routing statistics over packed rows of a corpus sample: the most "
                                            "frequent tokens per depth, sampling accuracy and dead-token ratio "
                                            "(expert-choice), load, MaxVio and entropy (token-choice), and the NLL "
                                            "against the maximum recursion steps allowed at inference.")
    _checkpoint_args(stats)
    stats.add_argument("--data", required=True,
                       help="text to sample: .txt (one document), .jsonl[.xz|.gz] (field 'text') or a folder "
                            "prepared by `mor data prepare` (its val split)")
    stats.add_argument("--rows", type=positive_int, default=32, help="rows to analyse (default 32)")
    stats.add_argument("--seq-len", type=positive_int,
                       help="tokens per row (default: min(2048, the model's max_position_embeddings))")
    stats.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward (default 8)")
    stats.add_argument("--top", type=positive_int, default=15, help="tokens listed per depth (default 15)")
    stats.add_argument("--no-scaling", action="store_true", help="skip the depth-scaling curve (Nr more passes)")
    stats.set_defaults(func=run_stats)

    runs = commands.add_parser("runs", help="loss curves and NLL against FLOPs of training runs",
                               description="Plot loss_curves.png and nll_vs_flops.png from run directories "
                                           "written by `mor train` (metrics.jsonl, model_config.json, config.yaml).")
    runs.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    runs.add_argument("--out", type=Path, required=True, help="output folder")
    runs.add_argument("--names", nargs="+", help="legend names, one per run (default: folder names)")
    runs.add_argument("--flops-per-token", nargs="+", type=float, metavar="FLOPS",
                      help="forward FLOPs per token instead of counting them from each run's config: one value for "
                           "all runs or one per run")
    runs.add_argument("--seq-len", type=positive_int, help="sequence length for the FLOP count (default: each run's)")
    runs.set_defaults(func=run_runs)

    bench = commands.add_parser("bench", help="throughput against NLL from benchmark JSON",
                                description="Plot throughput_vs_nll.png from benchmark JSON files (lists of "
                                            "records with a model name, tokens_per_s or a normalised throughput, "
                                            "and optionally nll).")
    bench.add_argument("files", nargs="+", type=Path, metavar="JSON")
    bench.add_argument("--out", type=Path, required=True, help="output folder")
    bench.add_argument("--nll", nargs="+", default=[], metavar="NAME=NLL",
                       help="NLL of named models, for records without one (e.g. vanilla=2.78 mor-expert-3=2.79); "
                            "SHAPE/NAME=NLL sets it for one shape only (smollm-360m/vanilla=2.78)")
    bench.add_argument("--baseline", help="express throughput relative to this model (the paper uses vanilla)")
    bench.set_defaults(func=run_bench)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _checkpoint_args(parser: argparse.ArgumentParser) -> None:
    # float32 by default: router scores near the causal threshold are what the analyses look at.
    add_checkpoint_arguments(parser, dtype="float32")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_routing_argument(parser)


def _handler(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Check for matplotlib and the output folder before the work, not after it."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            raise ModuleNotFoundError(INSTALL_HINT, name="matplotlib") from None
        writable_folder(args.out, "--out")
        return func(args)

    return run


@_handler
def run_depth(args: argparse.Namespace) -> int:
    from mor.viz.report import depth_text_report

    text = args.text if args.text is not None else _read_text(args.text_file)
    model, tokenizer = load_model(args)
    depths = depth_text_report(model, tokenizer, text, args.out, routing_modes(model, args.routing))
    for mode, values in depths.items():
        print(f"{mode}: {len(values)} tokens, mean depth {sum(values) / len(values):.3f}")
    print(f"wrote {args.out / 'depth.html'}, {args.out / 'depth.png'}, {args.out / 'depth.json'}", file=sys.stderr)
    return 0


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"--text-file {path} {'is a folder' if path.is_dir() else 'does not exist'}; give a "
                                "UTF-8 text file, or the text itself with --text")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--text-file {path} is not UTF-8 text (byte {error.start}); give a UTF-8 text file") from None


@_handler
def run_stats(args: argparse.Namespace) -> int:
    import torch

    from mor.eval.perplexity import source_rows
    from mor.viz.report import routing_stats_report

    model, tokenizer = load_model(args)
    seq_len = args.seq_len or min(2048, model.config.max_position_embeddings)
    if seq_len > model.config.max_position_embeddings:
        context = model.config.max_position_embeddings
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {context}; use at most "
                         f"{context}")
    rows = list(islice(source_rows(args.data, tokenizer, seq_len, model.config.vocab_size), args.rows))
    if not rows:
        raise ValueError(f"{args.data} holds fewer than {seq_len} tokens; give more text or a smaller --seq-len")
    if len(rows) < args.rows:
        print(f"{args.data} yields only {len(rows)} rows of {seq_len} tokens", file=sys.stderr)
    if not args.no_scaling and not model.config.is_cycle:
        print("depth scaling skipped: the model's depth cannot be capped (no cycle sharing)", file=sys.stderr)
    results = routing_stats_report(model, tokenizer, torch.tensor(rows), args.out,
                                   routing_modes(model, args.routing), top=args.top, batch_size=args.batch_size,
                                   scaling=not args.no_scaling)
    print("\n".join(stats_summary(results)))
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} in {args.out}", file=sys.stderr)
    return 0


def stats_summary(results: dict) -> list[str]:
    """A few lines per routing mode; the full numbers are in routing_metrics.json and depth_scaling.json."""
    def percents(values: list[float]) -> str:
        return " / ".join(f"{v:.1%}" for v in values)

    lines = [results["model"]]
    for mode, m in results["modes"].items():
        line = (f"{mode}: NLL {m['nll']:.3f}, mean depth {m['mean_depth']:.2f}, tokens per depth "
                f"{percents(m['depth_fraction'])}")
        accuracy = [m[k] for k in sorted(m) if k.startswith("sampling_accuracy/")]
        if accuracy:
            line += f", router sampling accuracy {percents(accuracy)}"
        if "dead_token_ratio" in m:
            line += f", dead tokens {m['dead_token_ratio']:.1%}"
        if "load" in m:
            line += f", load {percents(m['load'])}, MaxVio {m['max_violation']:.3f}, entropy {m['entropy']:.3f}"
        lines.append(line)
    for name, nll in results.get("depth_scaling", {}).items():
        lines.append(f"depth scaling, {name}: NLL " + ", ".join(f"{v:.3f}" for v in nll)
                     + " at 1.." + str(len(nll)) + " recursions")
    return lines


@_handler
def run_runs(args: argparse.Namespace) -> int:
    from mor.viz.runs import flops_per_token, load_run, plot_loss_curves, plot_nll_vs_flops

    if args.names and len(args.names) != len(args.run_dirs):
        raise ValueError(f"--names gives {len(args.names)} names for {len(args.run_dirs)} runs; give one per run")
    given = args.flops_per_token
    if given and len(given) not in (1, len(args.run_dirs)):
        raise ValueError(f"--flops-per-token takes one value or one per run ({len(args.run_dirs)}), got "
                         f"{len(given)}")
    runs = [load_run(path, name) for path, name in zip(args.run_dirs, args.names or [None] * len(args.run_dirs))]
    written = []
    if path := plot_loss_curves(runs, args.out / "loss_curves.png"):
        written.append(path)
    else:
        print("no run logged a loss or validation NLL: loss_curves.png not written", file=sys.stderr)
    flops = [given[0] if len(given) == 1 else given[i] for i in range(len(runs))] if given else \
        [flops_per_token(run, args.seq_len) for run in runs]
    for run, per_token in zip(runs, flops):
        print(f"{run.name}: {per_token:.4g} forward FLOPs per token")
    if path := plot_nll_vs_flops(runs, flops, args.out / "nll_vs_flops.png"):
        written.append(path)
    else:
        print("no run logged tokens with a loss: nll_vs_flops.png not written", file=sys.stderr)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0 if written else 1


@_handler
def run_bench(args: argparse.Namespace) -> int:
    from mor.viz.bench import load_bench, normalise, plot_throughput_vs_nll

    nll = {}
    for item in args.nll:
        name, _, value = item.partition("=")
        try:
            nll[name] = float(value)
        except ValueError:
            raise ValueError(f"--nll {item!r}: expected NAME=NUMBER, e.g. vanilla=2.78") from None
    points = load_bench(args.files, nll)
    if not points:
        raise ValueError("no usable benchmark records: each needs a model name and tokens_per_s or a throughput")
    if args.baseline:
        points = normalise(points, args.baseline)
    for p in points:
        nll_text = "" if p.nll is None else f", NLL {p.nll:.4f}"
        print(f"{p.name}{f' [{p.group}]' if p.group else ''}: {p.throughput:.4g} {p.unit}{nll_text}")
    path = plot_throughput_vs_nll(points, args.out / "throughput_vs_nll.png")
    print(f"wrote {path}", file=sys.stderr)
    return 0
