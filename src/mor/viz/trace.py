"""Run a model over token rows and record what its routers did.

A :class:`RoutingTrace` holds, per token, the recursion depth it ran and the router outputs behind that depth:
for expert-choice the decision probability of every step the token entered (the main router's
``sigmoid(logit)``, or the auxiliary router's when the model has one: the score its causal decisions use), for
token-choice the router's probabilities over the depths. The router outputs are read with forward hooks, so
the model runs exactly as it does anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mor.model import MoRForCausalLM


@dataclass
class RoutingTrace:
    """What a model did on ``input_ids`` [N, T] in one routing mode (None: a model without router)."""

    routing: str | None
    input_ids: Tensor
    depths: Tensor  # [N, T] recursion steps each token ran
    nll: float  # mean next-token negative log-likelihood (nats)
    # Expert-choice: per step, [N, T] decision probabilities, NaN where the token did not enter the step.
    scores: list[Tensor] = field(default_factory=list)
    threshold: float = 0.5  # a token continues in causal mode when its score is at least this
    probs: Tensor | None = None  # token-choice: [N, T, Nr] router probabilities


@torch.inference_mode()
def trace(model: MoRForCausalLM, rows: Tensor, routing: str | None = None, *, batch_size: int = 8,
          max_recursions: int | None = None, progress: bool = False) -> RoutingTrace:
    """Run ``model`` over ``rows`` [N, T] (equal-length rows without padding) and record depths, router outputs
    and the next-token NLL. ``max_recursions`` caps the recursion steps as in ``model(..., max_recursions=)``."""
    if rows.dim() != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be [num_rows, seq_len] with seq_len >= 2, got shape {tuple(rows.shape)}")
    model.eval()
    device = next(model.parameters()).device
    kwargs = {} if routing is None else {"routing": routing}
    depths, nll_sum, count = [], 0.0, 0
    with _router_outputs(model) as outputs:
        for start in tqdm(range(0, len(rows), batch_size), desc=f"trace [{routing or 'no router'}]",
                          unit="batch", disable=not progress):
            ids = rows[start:start + batch_size].to(device)
            out = model(ids, labels=ids, max_recursions=max_recursions, **kwargs)
            tokens = ids.numel() - len(ids)  # each row predicts seq_len - 1 tokens
            nll_sum += out.lm_loss.item() * tokens
            count += tokens
            depths.append(out.depths.cpu())
            outputs.end_batch(out.depths.cpu())
    result = RoutingTrace(routing, rows.cpu(), torch.cat(depths), nll_sum / count)
    result.scores, result.probs = outputs.scores(), outputs.probs()
    result.threshold = outputs.threshold
    return result


class _RouterOutputs:
    """Collects router outputs batch by batch and places them at the token positions they belong to."""

    def __init__(self, model: MoRForCausalLM) -> None:
        config = model.config
        expert, token = model.model.expert, model.model.token
        self.token_choice = token is not None
        self.modules: list[torch.nn.Module] = []
        self.threshold = 0.5
        if expert is not None:
            # Causal decisions use the auxiliary router when there is one (threshold 0.5 on its probability),
            # else the main router against the configured threshold; sampling accuracy uses the same test.
            self.modules = list(expert.aux_routers) or list(expert.routers)
            self.threshold = 0.5 if len(expert.aux_routers) else config.causal_threshold
        elif token is not None and token.router is not None:
            self.modules = [token.router]
        self.softmax = config.gate_func == "softmax"
        self._pending: list[Tensor] = []
        self._batches: list[list[Tensor]] = []

    def hook(self, module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
        self._pending.append(output.detach().float().cpu())

    def end_batch(self, depths: Tensor) -> None:
        if self.token_choice:
            batch = [(p.softmax(-1) if self.softmax else p.sigmoid()) for p in self._pending]
        else:
            batch = [_scatter_step(p.squeeze(-1).sigmoid(), depths >= step) for step, p in enumerate(self._pending)]
        self._batches.append(batch)
        self._pending = []

    def scores(self) -> list[Tensor]:
        if self.token_choice or not self._batches:
            return []
        steps = min(len(b) for b in self._batches)
        return [torch.cat([b[s] for b in self._batches]) for s in range(steps)]

    def probs(self) -> Tensor | None:
        if not self.token_choice or not self._batches or not self._batches[0]:
            return None
        return torch.cat([b[0] for b in self._batches])


def _scatter_step(scores: Tensor, entered: Tensor) -> Tensor:
    """Place the scores of one step's candidates [B, K] at their positions [B, T].

    The tokens that entered step s (0-based) are those that ran at least s steps. The router saw them in
    position order, each row's real candidates first (then padding slots of ragged causal selections)."""
    full = torch.full(entered.shape, float("nan"))
    slots = torch.arange(scores.shape[1])[None, :] < entered.sum(1, keepdim=True)
    full[entered] = scores[slots]
    return full


@contextmanager
def _router_outputs(model: MoRForCausalLM) -> Iterator[_RouterOutputs]:
    outputs = _RouterOutputs(model)
    handles = [m.register_forward_hook(outputs.hook) for m in outputs.modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def depth_scaling(model: MoRForCausalLM, rows: Tensor, routing: str | None = None, *, batch_size: int = 8,
                  progress: bool = False) -> list[float]:
    """Test-time depth scaling (paper Fig. 5c): the NLL of ``rows`` when inference may run at most
    1, 2, ..., Nr recursion steps (tokens routed deeper exit at the cap)."""
    config = model.config
    if not config.is_cycle:
        raise ValueError(f"depth scaling needs a model whose block recurs step by step (sharing 'cycle' or "
                         f"'middle_cycle'); this one has sharing={config.sharing!r}")
    limits = range(1, config.num_recursions + 1)
    return [trace(model, rows, routing, batch_size=batch_size, max_recursions=m).nll
            for m in tqdm(limits, desc=f"depth scaling [{routing or 'no router'}]", unit="depth",
                          disable=not progress)]
