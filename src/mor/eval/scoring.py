"""Batched log-likelihood of continuations given contexts: the primitive behind every zero/few-shot metric.

The request format follows lm-evaluation-harness so that both paths give the same numbers: the model reads
``(context + continuation)[:-1]`` (left-truncated to its context window) and we sum the log-probabilities of
the continuation tokens. Rows of a batch are right-padded and the padding is masked with ``attention_mask``;
MoR models guarantee that padding takes part neither in attention nor in routing, so a request scores the
same alone or in any batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TokenRequest = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and ``continuation`` as lm-evaluation-harness forms them.

    Trailing whitespace of the context moves to the continuation (``"Answer: " + "yes"`` is scored as
    ``"Answer:" + " yes"``, which is how BPE tokenizes running text); the pair is encoded as one string and
    split after the context's tokens. An empty context becomes the single token ``prefix_id`` (end-of-text).
    """
    if not context.strip():  # nothing (or only whitespace) to condition on
        return [prefix_id], tokenizer.encode(context + continuation, add_special_tokens=False).ids
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation, add_special_tokens=False).ids
    context_ids = tokenizer.encode(stripped, add_special_tokens=False).ids
    return context_ids, whole[len(context_ids):]


def routing_kwargs(routing: str | None) -> dict[str, Any]:
    """Keyword arguments selecting a routing mode; none for models without routing."""
    return {} if routing is None else {"routing": routing}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[TokenRequest],
    *,
    max_length: int,
    batch_size: int = 8,
    routing: str | None = None,
    pad_id: int = 0,
    desc: str = "scoring",
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """``(sum of continuation log-probs, whether greedy decoding reproduces the continuation)`` per request.

    Requests are scored longest first (similar lengths share a batch, and an out-of-memory error shows up on
    the first batch); results come back in the input order. Inputs longer than ``max_length`` lose tokens from
    the left, with one warning per call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for index, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError(f"request {index}: the context is empty; start it with a token such as end-of-text "
                             "(encode_pair does this)")
        if not 0 < len(continuation) <= max_length:
            raise ValueError(f"request {index}: the continuation has {len(continuation)} tokens; it needs "
                             f"between 1 and max_length={max_length}")
    model.eval()
    device = model_device(model)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    truncated = 0
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            rows = []
            for i in batch:
                context, continuation = requests[i]
                tokens = [*context, *continuation][:-1]
                if len(tokens) > max_length:
                    truncated += 1
                    tokens = tokens[-max_length:]
                rows.append(tokens)
            width = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, row in enumerate(rows):
                input_ids[b, :len(row)] = torch.tensor(row)
                attention_mask[b, :len(row)] = 1
            logits = model(input_ids.to(device), attention_mask=attention_mask.to(device),
                           **routing_kwargs(routing)).logits
            for b, i in enumerate(batch):
                target = torch.tensor(requests[i][1], device=device)
                end = len(rows[b])
                logprobs = logits[b, end - len(target):end].float().log_softmax(-1)
                total = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (total, greedy)
            bar.update(len(batch))
    if truncated:
        logger.warning("%d of %d requests were longer than max_length=%d tokens and lost tokens from the left",
                       truncated, len(requests), max_length)
    return results


def pad_token_id(model: torch.nn.Module) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return 0 if pad is None else pad


def eos_token_id(model: torch.nn.Module) -> int:
    """End-of-text id: the context of a request whose context is empty, as in lm-evaluation-harness."""
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):  # Hugging Face configs may list several; the first is end-of-text
        eos = eos[0] if eos else None
    return 0 if eos is None else eos
