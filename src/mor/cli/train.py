"""``mor train CONFIG.yaml [--set key.path=value ...] [--steps N] [--resume [PATH]] [--dry-run]``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mor.cli.common import add_set_argument, positive_int
from mor.train.config import TrainConfig, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model from a YAML config",
        description="Train a vanilla, recursive or MoR model. Launch with torchrun for several GPUs "
                    "(run.strategy=ddp or fsdp).")
    parser.add_argument("config", help="YAML training config (see configs/)")
    add_set_argument(parser, "override config values, e.g. --set optim.lr=1e-3 run.out_dir=runs/x")
    parser.add_argument("--steps", type=positive_int, metavar="N",
                        help="train for N optimizer steps, whatever budget the config gives (a short try)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the latest checkpoint in run.out_dir (no PATH; starts fresh if there is "
                             "none), or from a checkpoint or run directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="make every check of a real run (config, data, run directory), print the resolved "
                             "budget and exit")
    parser.add_argument("--world-size", type=positive_int, default=None,
                        help="with --dry-run: number of processes to plan for (default: $WORLD_SIZE or 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mor.train.trainer import train  # heavy imports only when training

    config = load_config(args.config, args.overrides, steps=args.steps)
    if args.dry_run:
        return _dry_run(config, args.world_size or int(os.environ.get("WORLD_SIZE", "1")), args.resume)
    result = train(config, resume=args.resume)
    if result.stopped_by is None and int(os.environ.get("RANK", "0")) == 0:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.validation.items())
        loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
        print(f"done: step {result.step}, {result.tokens:,} tokens, loss {loss}"
              + (f", {summary}" if summary else "") + f"; run directory {config.run.out_dir}")
    return 0


def _dry_run(config: TrainConfig, world_size: int, resume: str | None) -> int:
    from mor.outputs import writable_folder
    from mor.train.budget import resolve_budget
    from mor.train.schedule import decay_steps, warmup_steps
    from mor.train.trainer import open_data, resume_checkpoint

    model_config = config.model_config()
    budget = resolve_budget(config, model_config, world_size)
    print(f"model: {model_config.sharing} sharing, Nr={model_config.num_recursions}, router {model_config.router}, "
          f"{model_config.num_effective_layers} effective layers")
    print(f"batch: {config.batch.micro_batch_size} sequences x {budget.grad_accum} accumulation x {world_size} "
          f"processes x {config.data.seq_len} tokens = {budget.tokens_per_step:,} tokens per step")
    print(f"budget: {budget.steps:,} steps, {budget.tokens:,} tokens, {budget.flops:.4g} forward FLOPs "
          f"({budget.forward_flops_per_token:.4g} per token)")
    print(f"schedule: {config.schedule.kind}, warm-up {warmup_steps(config.schedule, budget.steps)} steps"
          + (f", decay {decay_steps(config.schedule, budget.steps)} steps" if config.schedule.kind == "wsd" else ""))
    # The checks of a real run, short of building the model: the data, the run directory, the checkpoint.
    open_data(config, model_config, budget, world_size=world_size)
    writable_folder(config.run.out_dir, "run.out_dir", create=False)
    resume_checkpoint(Path(config.run.out_dir), resume)
    print("checks: data, run directory and resume point are fine")
    return 0
