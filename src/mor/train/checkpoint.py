"""Training checkpoints: everything needed to continue a run bit for bit.

Layout of ``RUN/checkpoints/step_00000100/``:

* ``model.safetensors`` + ``config.json``: the full model state (parameters and buffers such as the balancing
  bias) in the format of ``save_pretrained`` (:mod:`mor.model.io`), loadable on its own with
  ``MoRForCausalLM.from_pretrained``;
* ``trainer.pt``: optimizer, scheduler, step and token counters, and per rank the data position and RNG states;
* ``tokenizer.json``: the prepared data's tokenizer, so the folder is all that eval and generation need;
* ``manifest.json``: size and SHA-256 of each file, written last, and that the weights were checked.

A checkpoint is written into a hidden temporary directory that is renamed into place, so a crash never leaves a
half-written checkpoint under a real name; the temporary directories of killed writers are removed by the next
save. Weights that hold NaN/inf or have exploded are never saved, so every checkpoint of a run is a good one to
resume from. Loading checks the manifest, the model config and the weights first and refuses a truncated,
corrupt, unsafe or incompatible checkpoint with a message instead of loading it partially.

Distributed runs gather full (unsharded) state dicts through ``torch.distributed.checkpoint.state_dict``, which
treats plain, DDP and FSDP2 models alike; rank 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from mor.config import MoRConfig
from mor.data.tokenizer import TOKENIZER_FILE
from mor.integrity import (MANIFEST_FILE, CheckpointError, describe_file, read_manifest, safe_torch_load,
                           verify_manifest, weight_problem)
from mor.model.io import CONFIG_FILE, WEIGHTS_FILE, load_weights, save_model_files, tied_parameter_names
from mor.outputs import pid_alive
from mor.train.distributed import unwrap

CHECKPOINTS = "checkpoints"
TRAINER_FILE = "trainer.pt"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_TMP = re.compile(r"^\.tmp-step_\d+-(\d+)$")  # .tmp-step_00000100-PID: a checkpoint being written by PID


class BadWeightsError(CheckpointError):
    """The model's weights hold NaN/inf or have exploded: they were not saved."""


# ------------------------------------------------------------------------------------------------- finding
def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def last_good_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose weights were checked when it was saved (older versions of mor did not)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            if read_manifest(path).get("weights_checked"):
                return path
        except CheckpointError:
            continue
    return None


def set_aside_later_checkpoints(run_dir: str | Path, step: int) -> list[Path]:
    """Resuming from an earlier checkpoint starts a new branch: move the later checkpoints of the abandoned one
    to ``checkpoints/abandoned/`` so that rotation and ``--resume`` never pick them (nothing is deleted)."""
    moved = []
    for path in list_checkpoints(run_dir):
        if int(path.name.removeprefix("step_")) > step:
            target = Path(run_dir) / CHECKPOINTS / "abandoned" / path.name
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    return moved


# ------------------------------------------------------------------------------------------------- saving
def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    model_config: MoRConfig, trainer_state: dict[str, Any], rank_state: dict[str, Any],
                    keep_last: int, tokenizer: Path | None = None) -> Path:
    """Write a checkpoint (collective: every rank calls it) and keep only the newest ``keep_last``.

    ``tokenizer`` (the prepared data's tokenizer.json) is copied along, so the checkpoint folder is all that
    ``mor eval``, ``mor generate`` and ``mor viz`` need. Raises BadWeightsError, writing nothing, when the weights
    hold NaN/inf or have exploded."""
    model_state = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rank_states = _gather(_plain(rank_state))
    # Rank 0 holds the full state and judges it; every rank gets the verdict, so all of them stop together.
    parameters = [name for name, _ in unwrap(model).named_parameters(remove_duplicate=False)]
    problem = _gather(weight_problem(model_state, parameters) if _rank() == 0 else None)[0]
    if problem is not None:
        raise BadWeightsError(f"{problem}; the weights of step {step} were not saved")
    target = checkpoint_dir(run_dir, step)
    if _rank() == 0:
        remove_stale_temporaries(run_dir)
        tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model_files(tmp, model_config, model_state, tied_parameter_names(unwrap(model)))
        torch.save({**_plain(trainer_state), "optimizer": optim_state, "rank_states": rank_states},
                   tmp / TRAINER_FILE)
        names = [WEIGHTS_FILE, CONFIG_FILE, TRAINER_FILE]
        if tokenizer is not None and tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            names.append(TOKENIZER_FILE)
        files = {name: describe_file(tmp / name) for name in names}
        manifest = {"step": step, "weights_checked": True, "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():  # re-saving the same step (e.g. a stop signal right after a periodic save)
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return target


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary directories of checkpoint writers that are gone (killed mid-save)."""
    removed = []
    for path in (Path(run_dir) / CHECKPOINTS).glob(".tmp-step_*"):
        match = _TMP.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------- loading
def restore_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    model_config: MoRConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model and optimizer in place; return the trainer state and this rank's data/RNG state."""
    path = Path(path)
    verify_checkpoint(path)
    saved = json.loads((path / CONFIG_FILE).read_text())
    current = model_config.to_dict()
    differences = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
                   for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differences:
        raise CheckpointError(f"{path} was trained with a different model config ({'; '.join(differences)}); "
                              "resume with the run's own config or start a new run directory")
    try:
        state = safe_torch_load(path / TRAINER_FILE)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} could not be read ({error}); it is corrupt: resume from an earlier "
                              "checkpoint") from None
    # Names and full shapes from the module itself: the gathered full state dict exists on rank 0 only.
    module = unwrap(model)
    model_state = load_weights(path, module, bounded=[name for name, _ in module.named_parameters()])
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    try:
        set_optimizer_state_dict(model, optimizer, state.pop("optimizer"),
                                 options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model/optimizer ({error}); "
                              "start a new run directory") from None
    rank_states = state.pop("rank_states")
    if len(rank_states) != _world_size():
        raise CheckpointError(f"{path} was written by {len(rank_states)} processes but this run has "
                              f"{_world_size()}; resume with the same number of processes")
    return state, rank_states[_rank()]


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present, complete and intact."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST_FILE}); point --resume to a "
                              f"directory like RUN/{CHECKPOINTS}/step_00001000 or to the run directory")
    verify_manifest(path)


# ------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------- helpers
def _plain(value: Any) -> Any:
    """numpy values to Python/torch ones, so ``torch.load(weights_only=True)`` can read the file back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    result: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(result, obj)
    return result


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
