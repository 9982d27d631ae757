"""Options that several ``mor`` commands share, defined once: ``--set``, checkpoint loading (checkpoint, tokenizer,
device, dtype, manifest check), ``--routing`` and integer argument types.

Nothing here imports torch: handlers call :func:`load_model`, which imports the model when a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mor.config import DTYPES, ROUTING_MODES, MoRConfig, parse_assignment

if TYPE_CHECKING:
    import torch

    from mor.data.tokenizer import TextTokenizer

CHECKPOINT_HELP = "directory written by save_pretrained or training (config.json + model.safetensors)"


class SetAction(argparse.Action):
    """``--set KEY=VALUE``: repeatable, and one ``--set`` may take several pairs. Each pair is checked while
    parsing, so that a mistake is reported under the subcommand's usage."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        values = [values] if isinstance(values, str) else list(values or [])
        for text in values:
            try:
                parse_assignment(text)
            except ValueError as error:
                hint = "" if "=" in text else " (give positional arguments before --set)"
                parser.error(f"--set: {error}{hint}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The one ``--set`` option: ``args.overrides`` is the list of ``KEY=VALUE`` strings in the order given."""
    parser.add_argument("--set", dest="overrides", action=SetAction, nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"{help}; values are parsed as YAML; repeat --set or give several pairs after one")


def model_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set`` pairs that override MoRConfig fields, as keyword arguments; a name that is no field is an error."""
    fields = {f.name for f in dataclasses.fields(MoRConfig)}
    overrides = {}
    for text in pairs:
        name, value = parse_assignment(text)
        if name not in fields:
            raise ValueError(f"--set {text!r}: {name!r} is not a MoRConfig field")
        overrides[name] = value
    return overrides


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default auto: cuda when available)")


def add_checkpoint_arguments(parser: argparse.ArgumentParser, checkpoint_help: str = CHECKPOINT_HELP,
                             dtype: str = "auto") -> None:
    """The checkpoint to load and how: ``checkpoint``, ``--tokenizer``, ``--device``, ``--dtype`` (default
    ``dtype``) and ``--no-verify``; :func:`load_model` reads them."""
    parser.add_argument("checkpoint", help=checkpoint_help)
    parser.add_argument("--tokenizer", help="tokenizer.json (or a folder holding one); default: the checkpoint's")
    add_device_argument(parser)
    parser.add_argument("--dtype", default=dtype, choices=("auto", *DTYPES),
                        help=f"model dtype (default {dtype}; auto = bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against its manifest.json (saves reading very "
                             "large files twice)")


def load_model(args: argparse.Namespace, backend: str = "mor") -> tuple[torch.nn.Module, TextTokenizer]:
    """The model and tokenizer that :func:`add_checkpoint_arguments`' options name."""
    from mor.pretrained import load_model_and_tokenizer, resolve_device

    return load_model_and_tokenizer(args.checkpoint, args.tokenizer, resolve_device(args.device), args.dtype,
                                    backend=backend, verify=args.verify)


def add_routing_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routing", choices=("both", *ROUTING_MODES), default="both",
                        help="routing modes of an expert-choice model: 'topk' is the paper's per-sequence selection "
                             "(as in training), 'causal' the per-token decisions of decoding (default both)")


def routing_modes(model: Any, requested: str) -> list[str | None]:
    """The modes to run ``model`` in for ``--routing``: its config's :attr:`MoRConfig.routing_modes`, narrowed to
    ``requested`` where the mode matters; ``[None]`` for a model that is not a mor model (``--transformers``)."""
    config = getattr(model, "config", None)
    modes = list(config.routing_modes) if isinstance(config, MoRConfig) else [None]
    return modes if requested == "both" or modes == [None] else [requested]
