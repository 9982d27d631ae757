"""The checkpoint format, written and read here only: ``config.json`` and ``model.safetensors`` in a folder.

``save_pretrained`` and the training checkpoints write it; ``from_pretrained`` and resuming a run read it. The
weights file holds the full state dict (parameters and buffers such as the balancing bias) with each tensor stored
once: a tied parameter (the LM head tied to the embedding) is stored under its first name only and listed in the
file's ``aliases`` metadata. Reading checks every name and shape against the model and refuses NaN and infinities;
the checks themselves (and the file mode of the weights) live in :mod:`mor.integrity`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from mor.config import MoRConfig, read_json_object
from mor.integrity import CheckpointError, save_safetensors, weight_problem

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INTACT_CONFIG = ("give a checkpoint folder with an intact config.json (Hugging Face Llama or mor) or a .gguf "
                 "file")
# Entries that earlier versions stored and the model no longer has; reading skips them.
RETIRED = ("model.expert.num_training_forwards",)  # the capacity warm-up count, now kept by the trainer


def tied_parameter_names(model: nn.Module) -> dict[str, str]:
    """Each name of a tied parameter (the LM head tied to the embedding) mapped to the parameter's first name.

    Read off the module, not off a state dict: gathering a state onto the CPU (from a GPU, or from FSDP shards)
    copies every entry, so tied tensors no longer share memory there."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def save_model_files(directory: Path, config: MoRConfig, state: Mapping[str, torch.Tensor],
                     aliases: Mapping[str, str]) -> None:
    """Write ``config.json`` and ``model.safetensors`` (through a temporary file, renamed into place) into
    ``directory``: the tensors of ``state`` except the ``aliases`` (see :func:`tied_parameter_names`)."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items() if name not in aliases}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_safetensors(tensors, tmp, metadata={"format": "pt", "aliases": json.dumps(dict(aliases))})
    tmp.replace(directory / WEIGHTS_FILE)
    config.save(directory / CONFIG_FILE)


def require_model_files(directory: Path) -> None:
    """Raise FileNotFoundError, naming what is missing, unless ``directory`` holds both files."""
    for path in (directory / CONFIG_FILE, directory / WEIGHTS_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a checkpoint directory holds {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} (written by save_pretrained or training)")


def load_config(directory: Path) -> MoRConfig:
    """The config of checkpoint ``directory``; MoRConfig.load names the file in any error."""
    return MoRConfig.load(directory / CONFIG_FILE)


def load_weights(directory: Path, model: nn.Module, device: str | torch.device = "cpu",
                 bounded: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The state dict that ``directory`` holds for ``model``, tied names included, on ``device``. Raises
    CheckpointError when the file is unreadable, when its names or shapes differ from the model's, or when a value
    is NaN/inf or, in the parameters named in ``bounded``, has exploded (:func:`mor.integrity.weight_problem`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is unreadable or truncated: {error}") from error
    tensors = {name: t for name, t in tensors.items() if name not in RETIRED}
    state = {**tensors, **{name: tensors[source] for name, source in tied_parameter_names(model).items()
                           if source in tensors}}
    _check_names_and_shapes(path, state, model.state_dict())
    problem = weight_problem(tensors, bounded)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}; the checkpoint is unusable (a diverged run, or corrupt bytes): "
                              "use an earlier checkpoint")
    return state


def _check_names_and_shapes(path: Path, state: Mapping[str, torch.Tensor],
                            expected: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong):
        return
    details = []
    if missing:
        details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        details.append("shape mismatch " + ", ".join(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]))
    raise CheckpointError(f"{path} does not match the model of {path.parent / CONFIG_FILE}: " + "; ".join(details))


def is_mor_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a mor checkpoint folder: its ``config.json`` says ``model_type`` "mor" (a Hugging Face
    folder's names another type)."""
    config = Path(path) / CONFIG_FILE
    return config.is_file() and read_json_object(config, INTACT_CONFIG).get("model_type") == "mor"
