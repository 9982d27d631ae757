"""Training length: a budget of steps, tokens or forward FLOPs turned into optimizer steps.

FLOP budgets follow the paper (MOR_SPEC 8): ``tokens = flops / forward_flops_per_token`` and
``steps = ceil(tokens / tokens_per_step)``, which reproduces the step counts of the released 360M configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mor.config import MoRConfig
from mor.model import flops
from mor.train.config import TrainConfig


@dataclass(frozen=True)
class Budget:
    steps: int
    grad_accum: int  # micro-batches per optimizer step and rank
    tokens_per_step: int  # over all ranks
    forward_flops_per_token: float  # the paper's count at the training sequence length

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.forward_flops_per_token


def resolve_budget(config: TrainConfig, model_config: MoRConfig, world_size: int) -> Budget:
    grad_accum = config.grad_accum(world_size)
    tokens_per_step = config.batch.micro_batch_size * grad_accum * world_size * config.data.seq_len
    per_token = flops.forward_flops_per_token(model_config, seq_len=config.data.seq_len)
    budget = config.budget
    if budget.steps is not None:
        steps = budget.steps
    else:
        tokens = budget.tokens if budget.tokens is not None else budget.flops / per_token
        steps = math.ceil(tokens / tokens_per_step)
    return Budget(steps=steps, grad_accum=grad_accum, tokens_per_step=tokens_per_step,
                  forward_flops_per_token=per_token)
