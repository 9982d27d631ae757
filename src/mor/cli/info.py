"""``mor info``: parameter and FLOP table of a configuration, without building weights."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from mor.cli.common import add_set_argument, model_overrides
from mor.config import PRESETS, MoRConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="parameter and FLOP table of a model configuration",
        description="Print unique and unrolled parameters, forward FLOPs per token and the tokens a FLOP budget "
                    "buys. Example: mor info smollm-360m --set sharing=middle_cycle num_recursions=3 router=expert",
    )
    parser.add_argument("preset", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint's config.json")
    add_set_argument(parser, "override MoRConfig fields, e.g. --set sharing=middle_cycle num_recursions=3")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs")
    parser.add_argument("--budget", type=float, default=16.5e18, help="forward-FLOP budget (default 16.5e18)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mor.model import MoRForCausalLM
    from mor.model.flops import forward_flops_per_token, tokens_for_budget

    config = _config(args.preset, model_overrides(args.overrides))

    with torch.device("meta"):
        model = MoRForCausalLM(config)
    seq_len = args.seq_len or config.max_position_embeddings
    flops = forward_flops_per_token(config, seq_len)
    shape = "+".join(str(n) for n in _layout(config))
    rows = [
        ("sharing / recursions", f"{config.sharing} / {config.num_recursions} ({shape} layers)"),
        ("router / KV cache", f"{config.router} / {config.kv_cache}"),
        ("unique parameters", f"{model.num_parameters():,}"),
        ("unique non-embedding parameters", f"{model.num_parameters(exclude_embeddings=True):,}"),
        ("unrolled non-embedding parameters", f"{model.num_parameters(exclude_embeddings=True, unique=False):,}"),
        (f"forward FLOPs per token (N={seq_len})", f"{flops:.4g}"),
        (f"tokens for {args.budget:.3g} FLOPs", f"{tokens_for_budget(config, args.budget, seq_len) / 1e9:.2f}B"),
    ]
    if config.router == "expert":
        rows.insert(2, ("capacities", ", ".join(f"{c:.3f}" for c in config.step_capacities)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _config(name: str, overrides: dict) -> MoRConfig:
    """The preset ``name``, or the config.json (or checkpoint folder) at that path, with ``overrides``."""
    if name in PRESETS:
        return MoRConfig.from_preset(name, **overrides)
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{name} holds no config.json; give a checkpoint folder, a config.json or a "
                                    f"preset ({', '.join(PRESETS)})")
    elif not path.exists() and ("/" in name or name.endswith(".json")):
        raise FileNotFoundError(f"{name} does not exist; give a config.json, a checkpoint folder or a preset "
                                f"({', '.join(PRESETS)})")
    elif not path.exists():
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; choose one of {', '.join(PRESETS)}, or give a config.json")
    return MoRConfig.load(path).replace(**overrides)


def _layout(config: MoRConfig) -> list[int]:
    if config.sharing == "none":
        return [config.num_hidden_layers]
    block = config.recursion_block_size
    return [1, block, 1] if config.is_middle else [block]
