"""``mor generate``: stream text from a checkpoint, optionally coloured by the recursion depth of each token."""

from __future__ import annotations

import argparse
import sys
import time

from mor.cli.common import add_checkpoint_arguments, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text from a checkpoint, streaming it",
        description="Generate a continuation of --prompt with per-layer KV caches and causal routing (a token "
                    "continues to the next recursion while its router says so), streaming the text as it is "
                    "produced. --color-depth colours each token by the recursion depth that produced it.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", default="", help="text to continue (default: start from the end-of-document "
                                                     "token, as for unconditional samples)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy "
                                                                       "(default 1.0)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample within the smallest set of probability >= p")
    parser.add_argument("--seed", type=int, help="random seed for repeatable samples")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop once the text contains TEXT (repeatable); the end-of-document token always stops")
    parser.add_argument("--max-recursions", type=int, help="cap the recursion depth at inference")
    parser.add_argument("--extra-recursions", type=int, default=0,
                        help="apply the block this many more times to tokens that reach the last trained depth "
                             "(test-time depth scaling)")
    parser.add_argument("--color-depth", action="store_true", help="colour each token by its recursion depth (ANSI)")
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from mor.infer.generate import generate
    from mor.infer.streaming import TextStreamer, depth_legend

    model, tokenizer = load_model(args)
    prompt = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eos_token_id]
    streamer = TextStreamer(tokenizer, color_depth=args.color_depth, stop_token_ids={tokenizer.eos_token_id},
                            num_recursions=model.config.num_recursions)
    if args.prompt:
        print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    out = generate(model, torch.tensor([prompt]), max_new_tokens=args.max_new_tokens,
                   do_sample=args.temperature > 0, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, stop_strings=args.stop or None,
                   tokenizer=tokenizer, seed=args.seed, streamer=streamer, max_recursions=args.max_recursions,
                   extra_recursions=args.extra_recursions)
    elapsed = time.perf_counter() - start
    count = int(out.lengths[0])
    depths = out.depths[0, :count].float()
    summary = f"{count} tokens in {elapsed:.2f}s ({count / max(elapsed, 1e-9):.1f} tokens/s)"
    if count:
        summary += f", mean depth {depths.mean():.2f}"
    if args.color_depth:
        summary += "  " + depth_legend(model.config.num_recursions)
    print(summary, file=sys.stderr)
    return 0
