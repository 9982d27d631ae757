"""``mor convert SRC OUT --to mor|recursive|hf``: import, up-training conversion and export of checkpoints.

SRC is a mor checkpoint, a Hugging Face Llama folder or a GGUF file. ``--to mor`` writes the mor format (a
vanilla import, or a Recursive/MoR model with ``--sharing``/``--router``), ``--to recursive`` the same with
Middle-Cycle sharing by default and no router, ``--to hf`` a ``LlamaForCausalLM`` folder. Tokenizer files next
to SRC (or from ``--tokenizer``) are copied along.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mor.cli.common import add_set_argument, model_overrides
from mor.config import DTYPES, INITS, KV_CACHES, RECURSIVE_SHARING


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="import Hugging Face Llama / GGUF checkpoints, make Recursive or MoR models from them, "
                        "export to Hugging Face",
        description="Convert between checkpoint formats and initialise Recursive/MoR models from a pretrained "
                    "vanilla model (the paper's up-training initialisations, MOR_SPEC 3.2).")
    parser.add_argument("src", type=Path, help="mor checkpoint folder, Hugging Face Llama folder or .gguf file")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--to", required=True, choices=("mor", "recursive", "hf"),
                        help="mor: mor checkpoint (vanilla unless --sharing/--router); recursive: mor checkpoint "
                             "with shared layers (default --sharing middle_cycle), no router; hf: LlamaForCausalLM "
                             "folder (vanilla or recursive source, recursion unrolled)")
    parser.add_argument("--sharing", choices=RECURSIVE_SHARING, help="parameter sharing strategy")
    parser.add_argument("--num-recursions", type=int, default=3, help="Nr, recursions of the shared block "
                                                                      "(default 3)")
    parser.add_argument("--init", choices=INITS, default="stepwise",
                        help="which original layers initialise the shared block (default stepwise)")
    parser.add_argument("--router", choices=("expert", "token"), help="make a Mixture-of-Recursions model with this "
                                                                      "routing (implies --sharing middle_cycle)")
    parser.add_argument("--kv-cache", choices=KV_CACHES, help="KV caching strategy of the new model")
    add_set_argument(parser, "further MoRConfig fields of the new model, e.g. --set capacities=[1.0,0.5]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init and of fresh routers")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    parser.add_argument("--tokenizer", type=Path, help="folder or tokenizer.json whose tokenizer files to copy "
                                                       "(default: those next to SRC)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mor.interop.llama import copy_tokenizer_files, export_hf, load_any_model
    from mor.interop.recursive import source_layers, to_recursive
    from mor.outputs import writable_folder

    recursive = _recursive_options(args)
    if args.tokenizer is not None and not args.tokenizer.exists():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer} does not exist")
    if (args.out / "config.json").exists() and not args.overwrite:
        raise ValueError(f"{args.out} already holds a checkpoint; choose another folder or pass --overwrite")
    writable_folder(args.out, "OUT", create=False)
    model = load_any_model(args.src)
    if recursive is not None:
        model = to_recursive(model, **recursive)
        groups = source_layers(model.config, recursive["init"], args.seed)
        print(f"{recursive['init']} init: shared layers start from original layers "
              + ", ".join("+".join(map(str, group)) for group in groups))
    model = model.to(getattr(torch, args.dtype))
    if args.to == "hf":
        export_hf(model, args.out)
    else:
        model.save_pretrained(args.out)
    copied = copy_tokenizer_files(args.tokenizer or _folder(args.src), args.out)
    cfg = model.config
    kind = "vanilla" if cfg.sharing == "none" else f"{cfg.sharing} Nr={cfg.num_recursions}, router {cfg.router}"
    print(f"wrote {args.out} ({'LlamaForCausalLM' if args.to == 'hf' else 'mor'}): {kind}, "
          f"{cfg.num_effective_layers} effective layers, {model.num_parameters():,} parameters"
          + (f"; copied {', '.join(copied)}" if copied else "; no tokenizer files copied"))
    return 0


def _recursive_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Arguments of :func:`to_recursive`, or None when the model is written as it is."""
    sharing = args.sharing
    if args.to == "hf":
        if sharing or args.router or args.overrides or args.kv_cache:
            raise ValueError("--to hf writes the source model as it is; convert to a recursive model first "
                             "(--to recursive), then export that")
        return None
    if args.to == "recursive":
        if args.router:
            raise ValueError("--to recursive makes a model without routers; use --to mor --router expert|token")
        sharing = sharing or "middle_cycle"
    elif args.router:
        sharing = sharing or "middle_cycle"
    if sharing is None:
        if args.overrides or args.kv_cache:
            raise ValueError("--set/--kv-cache change a converted model; add --sharing or --router")
        return None
    overrides = model_overrides(args.overrides)
    if args.kv_cache:
        overrides["kv_cache"] = args.kv_cache
    return dict(sharing=sharing, num_recursions=args.num_recursions, init=args.init, router=args.router,
                seed=args.seed, **overrides)


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent
