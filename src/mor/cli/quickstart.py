"""``mor quickstart``: train a tiny Mixture-of-Recursions model on the bundled corpus, evaluate it, generate.

Needs nothing outside the package: the sample corpus (Shakespeare, public domain) and its 4,096-token tokenizer
ship with it. On an idle 2-core machine the default 300 steps took 79 s (the README's measured run).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mor.cli.common import add_device_argument
from mor.outputs import FolderLock

QUICKSTART_MODEL = dict(
    preset="quickstart", vocab_size=4096, max_position_embeddings=128,
    sharing="middle_cycle", num_recursions=3, router="expert",
)
PROMPT = "KING HENRY:\nNow, lords, "


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="train, evaluate and sample a tiny MoR model on the bundled corpus (2 CPU cores: about 2 minutes)",
        description="Prepare the bundled Shakespeare sample, train a tiny expert-choice MoR (Middle-Cycle, 3 "
                    "recursions), report validation NLL in both routing modes, generate text coloured by the "
                    "recursion depth of each token.")
    parser.add_argument("--out", default="runs/quickstart", help="output folder (data, run, checkpoints)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    add_device_argument(parser)
    parser.add_argument("--fresh", action="store_true", help="start over: delete an earlier run in OUT instead of "
                                                                 "resuming it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mor.data.sample import prepare_sample, sample_tokenizer_path
    from mor.data.shards import TokenShards
    from mor.data.tokenizer import load_tokenizer
    from mor.eval.perplexity import evaluate_perplexity, shard_rows
    from mor.infer.streaming import TextStreamer, depth_legend
    from mor.model import MoRForCausalLM
    from mor.train import config_from_dict, train

    out = Path(args.out)
    if args.fresh:  # a folder another process trains in is refused (its lock), not deleted under it
        FolderLock(out / "run", "mor quickstart").acquire().release()
        shutil.rmtree(out / "run", ignore_errors=True)
    seq_len = QUICKSTART_MODEL["max_position_embeddings"]
    print("[1/4] preparing the bundled sample corpus")
    prepare_sample(out / "data")

    print(f"[2/4] training a tiny MoR for {args.steps} steps")
    config = config_from_dict({
        "model": QUICKSTART_MODEL,
        "data": {"path": str(out / "data"), "seq_len": seq_len},
        "optim": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "wsd", "warmup": 0.05, "decay_fraction": 0.2},
        "budget": {"steps": args.steps},
        "batch": {"micro_batch_size": 8, "grad_accum": 1},
        "run": {"out_dir": str(out / "run"), "log_every": 10, "eval_every": 0, "eval_batches": 4,
                "save_every": 100, "keep_last": 1, "device": args.device},
    })
    result = train(config, resume=None if args.fresh else "latest")
    if result.checkpoint is None:
        print("training stopped before its first checkpoint")
        return 1

    print("[3/4] validation NLL (128-token rows of Macbeth and Twelfth Night)")
    model = MoRForCausalLM.from_pretrained(result.checkpoint).eval()
    shards = TokenShards(out / "data", split="val")
    for routing in model.config.routing_modes:  # expert-choice: both modes
        nll = evaluate_perplexity(model, shard_rows(shards, seq_len), num_rows=64, batch_size=16,
                                  routing=routing, source="val", progress=False)
        label = "top-k (as in training)" if routing == "topk" else "causal (as in decoding)"
        print(f"  {label:<24} NLL {nll.row_nll:.3f}  ppl {nll.ppl:.1f}")

    print(f"[4/4] sampling; each piece of text is coloured by the recursion depth of its token "
          f"({depth_legend(model.config.num_recursions)})")
    tokenizer = load_tokenizer(sample_tokenizer_path())
    prompt = torch.tensor([tokenizer.encode(args.prompt)])
    print(args.prompt, end="")
    streamer = TextStreamer(tokenizer, color_depth=True, num_recursions=model.config.num_recursions)
    output = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8,
                            top_k=50, seed=0, streamer=streamer)
    depths = output.depths[0, : int(output.lengths[0])].tolist()
    counts = [depths.count(d) for d in range(1, model.config.num_recursions + 1)]
    print("generated tokens per depth: " + ", ".join(f"{d}: {c}" for d, c in enumerate(counts, start=1)))
    print(f"run directory: {out / 'run'}; checkpoint: {result.checkpoint}")
    return 0
