"""Checks that keep bad bytes out: checksums and manifests, finite weights, safe pickles, plain file modes.

A checkpoint folder may hold ``manifest.json`` (training checkpoints do): the size and SHA-256 of each file, written
last. Every load of such a folder checks the files it reads against it, so overwritten or flipped bytes are
refused instead of loaded as weights that look fine and score badly.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MANIFEST_FILE = "manifest.json"
# Trained language-model weights stay within a few units (norm gains within tens); a runaway learning rate drives
# them to 1e20 and beyond long before the loss turns NaN. Parameters past this bound are treated as exploded.
MAX_WEIGHT = 1e4


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, unsafe or made for another model)."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(folder: Path) -> dict[str, Any]:
    file = folder / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file} is unreadable ({error}); the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{file} lists no files; the checkpoint is corrupt")
    return manifest


def verify_manifest(folder: str | Path, names: Iterable[str] | None = None) -> None:
    """Raise CheckpointError unless the files ``names`` (default: all the manifest lists) are present, complete and
    intact. Files the manifest does not list are not checked; a folder without a manifest passes."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file():
        return
    files = read_manifest(folder)["files"]
    for name in files if names is None else [n for n in names if n in files]:
        expected, path = files[name], folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
        actual = describe_file(path)
        if actual["bytes"] != expected["bytes"]:
            raise CheckpointError(f"{path} has {actual['bytes']} bytes, {MANIFEST_FILE} says {expected['bytes']}: "
                                  "the file is truncated or was replaced; use an intact copy or an earlier checkpoint")
        if actual["sha256"] != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum in {MANIFEST_FILE}: the file is corrupt or was "
                                  "changed after it was written; use an intact copy or an earlier checkpoint")


def weight_problem(state: Mapping[str, torch.Tensor], parameters: Iterable[str] = ()) -> str | None:
    """What is wrong with the values of a state dict, or None: a NaN or infinity in a floating-point tensor, or a
    magnitude above :data:`MAX_WEIGHT` in one of ``parameters`` (names; buffers such as token counts may be large)."""
    import torch  # here, not at the top: data preparation (and its worker processes) uses this module without torch

    bounded = set(parameters)
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} holds NaN or infinite values"
        if name in bounded and (peak := float(tensor.abs().max())) > MAX_WEIGHT:
            return f"{name} holds a value of magnitude {peak:.3g}, more than {MAX_WEIGHT:g}: the weights exploded"
    return None


def safe_torch_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` of tensors and plain containers only; a file that holds other Python objects (which could
    run code when unpickled) is refused with CheckpointError and never loaded."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is not a safe checkpoint: it holds Python objects other than tensors, which "
                              "could run code when loaded, so it was refused; use a checkpoint from a source you "
                              "trust, saved as safetensors or with tensors only") from None


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the file mode that ``open()`` gives (0o666 less the umask): safetensors
    writes 0600, which made the weights private while the other files of a checkpoint were not."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:  # read-only on Linux; os.umask would change it for a moment
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
