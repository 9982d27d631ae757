"""Forward FLOPs per token, counted the paper's way, and FLOP-matched training budgets (MOR_SPEC 8).

The paper counts Kaplan-style *forward* FLOPs: 2 per weight of each linear map, with the q, k, v and o
projections all counted as ``d x d`` (grouped-query attention is ignored), and attention scores and values on
the causal lower triangle only; embeddings, the LM head, norms and non-linearities are not counted.

Per layer and token, at sequence length N:  ``lin = 2 (4 d^2 + 3 d d_ff)``  and  ``att = 2 d (N + 1)``.

A layer that runs on a fraction ``c`` of the tokens (MoR step capacity, ``k = floor(c N)``) costs
``c lin + c^2 att`` with recursion-wise caching (queries and keys both shrink), and
``c (lin - 4 d^2) + c att`` when it reuses the keys/values of the first recursion (KV sharing: the K/V
projections are skipped, queries shrink, keys do not). Token-choice is counted at perfect balance, i.e. with the
same fractions. With these rules the counter reproduces every token budget of the paper (tests/test_flops.py).
"""

from __future__ import annotations

import math

from mor.config import MoRConfig
from mor.model.sharing import layer_plan


def layer_flops(config: MoRConfig, seq_len: int) -> tuple[float, float]:
    """(linear, attention) forward FLOPs per token of one full layer."""
    d, f = config.hidden_size, config.intermediate_size
    return 2.0 * (4 * d * d + 3 * d * f), 2.0 * d * (seq_len + 1)


def step_fractions(config: MoRConfig, seq_len: int) -> list[float]:
    """Fraction of tokens running each recursion step: ``floor(c_r N) / N`` for routed models, else 1."""
    if config.router == "none":
        return [1.0] * config.num_recursions
    return [max(1, math.floor(c * seq_len + 1e-9)) / seq_len for c in config.step_capacities]


def forward_flops_per_token(config: MoRConfig, seq_len: int = 2048) -> float:
    """Forward FLOPs per token of the unrolled model (see the module docstring)."""
    lin, att = layer_flops(config, seq_len)
    kv_proj = 4.0 * config.hidden_size**2
    plan = layer_plan(config)
    fraction = {p: 1.0 for p in range(plan.num_positions)}
    if len(plan.steps) == config.num_recursions:  # cycle strategies: step r is the r-th block application
        for step, c in zip(plan.steps, step_fractions(config, seq_len)):
            fraction.update({p: c for p in step})
    total = 0.0
    for position, c in fraction.items():
        if config.kv_cache == "share" and plan.kv_source(position) != position:
            total += c * (lin - kv_proj) + c * att
        else:
            total += c * lin + c * c * att
    return total


def tokens_for_budget(config: MoRConfig, flops: float, seq_len: int = 2048) -> float:
    """Training tokens that a forward-FLOP budget buys."""
    return flops / forward_flops_per_token(config, seq_len)


def flops_for_tokens(config: MoRConfig, tokens: float, seq_len: int = 2048) -> float:
    return tokens * forward_flops_per_token(config, seq_len)


def steps_for_budget(config: MoRConfig, flops: float, tokens_per_step: int, seq_len: int = 2048) -> int:
    """Optimizer steps for a forward-FLOP budget at a fixed number of tokens per step (rounded up)."""
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be positive, got {tokens_per_step}")
    return math.ceil(tokens_for_budget(config, flops, seq_len) / tokens_per_step)


def training_flops_per_token(config: MoRConfig, seq_len: int = 2048) -> float:
    """Forward plus backward: three times the forward count (the usual 6N rule applied to the paper's count)."""
    return 3.0 * forward_flops_per_token(config, seq_len)
