"""Training: YAML configs, AdamW with WSD/cosine schedules, FLOP budgets, checkpoints, DDP/FSDP2 (``mor train``)."""

from mor.train.config import ConfigError, TrainConfig, config_from_dict, load_config
from mor.train.trainer import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "TrainingDiverged", "TrainResult", "config_from_dict",
           "load_config", "train"]
