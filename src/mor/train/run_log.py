"""The run directory: resolved config, revision and environment, metrics as JSON Lines, optional TensorBoard.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step; on resume, records after the
checkpoint's step are dropped so the file always describes one continuous run.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from mor.config import MoRConfig

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per GPU (vendor data sheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class RunLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("run.tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only", file=sys.stderr)
            else:
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write_run_info(self, config: dict[str, Any], model_config: MoRConfig, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        model_config.save(self.run_dir / "model_config.json")
        info = {**info, "git": git_revision(), "environment": environment()}
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop metrics logged after ``step`` (a resumed run repeats them)."""
        path = self.run_dir / METRICS_FILE
        if not self.enabled or not path.is_file():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(key, value, metrics["step"])
                elif isinstance(value, list):
                    for i, item in enumerate(value):
                        self._writer.add_scalar(f"{key}/{i}", item, metrics["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one accelerator, or None when unknown (CPU, unlisted GPUs): then MFU is omitted."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated since the last call (GPU) or peak resident memory (CPU)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def git_revision() -> dict[str, Any] | None:
    """Commit of the source tree this package runs from, and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
