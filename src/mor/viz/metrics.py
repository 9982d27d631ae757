"""Routing metrics over a sample of token rows (MOR_SPEC 4.6, 5 and 10.3).

Expert-choice: *sampling accuracy* (how often the causal test ``score >= threshold`` agrees with the top-k
selection) and *dead-token ratio* (positions that no row sends to the last step). Token-choice: *load* per
depth, *MaxVio* and the *entropy* of the mean router probabilities. For every model: the NLL, the mean depth
and the fraction of tokens at each depth (which tokens go how deep: :mod:`mor.viz.depth_tokens`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mor.viz.trace import RoutingTrace


def dead_token_ratio(depths: Tensor, last_step: int) -> float:
    """Fraction of positions (columns of ``depths`` [N, T]) that no row sends to ``last_step``."""
    reached = (depths >= last_step).any(0)
    return 1.0 - reached.float().mean().item()


def sampling_accuracy(scores: Tensor, selected: Tensor, threshold: float = 0.5) -> float:
    """Fraction of the tokens that entered a step (finite ``scores``) where ``score >= threshold`` agrees with
    ``selected``, the top-k decision."""
    entered = ~scores.isnan()
    if not entered.any():
        return math.nan
    agree = (scores[entered] >= threshold) == selected[entered]
    return agree.float().mean().item()


def load_balance(depths: Tensor, num_recursions: int) -> tuple[list[float], float]:
    """Token-choice load (fraction of tokens assigned each depth 1..Nr) and MaxVio = (max - mean) / mean."""
    counts = torch.bincount(depths.flatten(), minlength=num_recursions + 1)[1:num_recursions + 1].double()
    load = counts / counts.sum().clamp(min=1)
    mean = load.mean()
    return load.tolist(), ((load.max() - mean) / mean).item()


def router_entropy(probs: Tensor) -> float:
    """Entropy (nats) of the mean router probabilities over all tokens of ``probs`` [..., Nr], renormalised."""
    mean = probs.reshape(-1, probs.shape[-1]).double().mean(0)
    p = mean / mean.sum()
    return -(p * p.clamp(min=1e-12).log()).sum().item()


def routing_metrics(trace: RoutingTrace, num_recursions: int) -> dict[str, Any]:
    """Everything above that applies to the traced model, as plain numbers for JSON."""
    depths = trace.depths
    histogram = torch.bincount(depths.flatten(), minlength=num_recursions + 1)
    metrics: dict[str, Any] = {
        "routing": trace.routing,
        "rows": depths.shape[0],
        "seq_len": depths.shape[1],
        "nll": trace.nll,
        "mean_depth": depths.double().mean().item(),
        "depth_fraction": (histogram.double() / histogram.sum()).tolist()[1:],
    }
    if trace.scores:
        metrics["dead_token_ratio"] = dead_token_ratio(depths, len(trace.scores))
        for step, scores in enumerate(trace.scores, start=1):
            selected = depths >= step
            entered = ~scores.isnan()
            metrics[f"selected_fraction/step{step}"] = selected[entered].float().mean().item()
            if trace.routing == "topk":  # in causal mode the decisions are the selection
                metrics[f"sampling_accuracy/step{step}"] = sampling_accuracy(scores, selected, trace.threshold)
    if trace.probs is not None:
        metrics["load"], metrics["max_violation"] = load_balance(depths, num_recursions)
        metrics["entropy"] = router_entropy(trace.probs)
    return metrics
