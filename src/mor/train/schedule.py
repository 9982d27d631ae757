"""Learning-rate schedules as multipliers of the peak LR, a pure function of the optimizer step.

* ``wsd`` (warmup-stable-decay, the paper's trapezoid, MOR_SPEC 9.2): linear warm-up, constant, then linear decay
  over the last ``decay_fraction`` of the steps to ``min_lr_ratio`` (0 by default).
* ``cosine``: linear warm-up, then half-cosine from 1 to ``min_lr_ratio`` (0.1 by default) at the last step.
* ``constant``: linear warm-up, then 1.

Step ``s`` counts from 0; warm-up reaches the peak at step ``warmup - 1``. Counts given as fractions are rounded
to the nearest step, which reproduces the warm-up and decay lengths of the released 360M configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mor.train.config import ScheduleConfig


def warmup_steps(config: ScheduleConfig, total_steps: int) -> int:
    if isinstance(config.warmup, float):
        return round(config.warmup * total_steps)
    return config.warmup


def decay_steps(config: ScheduleConfig, total_steps: int) -> int:
    return round(config.decay_fraction * total_steps) if config.kind == "wsd" else 0


def min_lr_ratio(config: ScheduleConfig) -> float:
    if config.min_lr_ratio is not None:
        return config.min_lr_ratio
    return 0.1 if config.kind == "cosine" else 0.0


def lr_multiplier(config: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """``f(step) -> lr / peak_lr`` for the configured schedule over ``total_steps`` optimizer steps."""
    warmup = warmup_steps(config, total_steps)
    decay = decay_steps(config, total_steps)
    if warmup + decay > total_steps:
        raise ValueError(f"schedule: warm-up ({warmup}) plus decay ({decay}) steps exceed the {total_steps} "
                         "training steps; shorten schedule.warmup or schedule.decay_fraction")
    floor = min_lr_ratio(config)
    kind = config.kind

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        if kind == "wsd":
            decay_start = total_steps - decay
            if step < decay_start or decay == 0:
                return 1.0
            remaining = max(total_steps - step, 0) / decay  # 1 at the start of the decay, 1/decay at the last step
            return floor + (1.0 - floor) * remaining
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (the step) goes into checkpoints; every param group keeps its own peak LR."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps))
