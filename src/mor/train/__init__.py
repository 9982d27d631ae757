"""Training: YAML configs, AdamW with WSD/cosine schedules, FLOP budgets, checkpoints, DDP/FSDP2 (``mor train``).

    from mor.train import load_config, train
    result = train(load_config("configs/quickstart.yaml", ["budget.steps=50"]))
"""

from typing import TYPE_CHECKING

from mor._lazy import lazy_exports
from mor.train.config import ConfigError, TrainConfig, config_from_dict, load_config

if TYPE_CHECKING:
    from mor.train.checkpoint import CheckpointError
    from mor.train.trainer import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["CheckpointError", "ConfigError", "TrainConfig", "Trainer", "TrainingDiverged", "TrainResult",
           "config_from_dict", "load_config", "train"]
lazy_exports(__name__, {"mor.train.trainer": ("Trainer", "TrainingDiverged", "TrainResult", "train"),
                        "mor.train.checkpoint": ("CheckpointError",)})
