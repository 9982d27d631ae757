"""Training: YAML configs, AdamW with WSD/cosine schedules, FLOP budgets, checkpoints, DDP/FSDP2 (``mor train``).

    from mor.train import load_config, train
    result = train(load_config("configs/quickstart.yaml", ["budget.steps=50"]))
"""

from __future__ import annotations

import importlib
from typing import Any

from mor.train.config import ConfigError, TrainConfig, config_from_dict, load_config

# The trainer pulls in torch.distributed.checkpoint; load it on first use so `mor --help` and the other
# commands start fast (PEP 562).
_LAZY = {"Trainer": "mor.train.trainer", "TrainingDiverged": "mor.train.trainer", "TrainResult": "mor.train.trainer",
         "train": "mor.train.trainer", "CheckpointError": "mor.train.checkpoint"}

__all__ = ["CheckpointError", "ConfigError", "TrainConfig", "Trainer", "TrainingDiverged", "TrainResult",
           "config_from_dict", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mor.train' has no attribute {name!r}")
