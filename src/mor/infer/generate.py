"""Autoregressive generation with per-layer KV caches and causal routing.

The prompt is prefilled in one forward pass; then each step feeds the sampled tokens back one at a time. Every
forward runs in the model's causal routing mode (MOR_SPEC 4.10): an expert-choice token continues to the next
recursion while ``sigmoid(router logit) >= causal_threshold`` (or its auxiliary router's logit is >= 0), a
token-choice token runs the depth its router picked. Cached decoding therefore yields exactly the logits and
depths of a full causal forward over the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mor.infer.sampling import SamplingParams, sample
from mor.infer.streaming import Decoder, Streamer
from mor.infer.page_pool import PagedCache
from mor.model.kv_cache import StaticKVCache

CACHES = ("static", "paged")


@dataclass
class GenerationOutput:
    """``tokens`` [B, N]: generated ids (``pad_token_id`` after a row ended); ``lengths`` [B]: tokens each row
    generated (an end token or the token that completed a stop string included); ``depths`` [B, N]: recursion
    depth of the forward pass that produced each token (0 after the end)."""

    tokens: Tensor
    lengths: Tensor
    depths: Tensor

    def sequences(self) -> list[list[int]]:
        """The generated ids of each row, without the padding after its end."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def check_prompts(lengths: Sequence[int], max_new_tokens: int, context: int, first: int = 0) -> None:
    """Clear errors for empty prompts, bad lengths and prompts that leave no room to generate (prompts are
    numbered from ``first``)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, n in enumerate(lengths, start=first):
        if n == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the model's BOS/EOS token)")
        if n > context:
            raise ValueError(f"prompt {i} has {n} tokens, more than the model's context (max_position_embeddings "
                             f"{context}); shorten it")
        if n + max_new_tokens > context:
            raise ValueError(f"prompt {i} has {n} tokens and {max_new_tokens} new tokens were asked for, but the "
                             f"model's context (max_position_embeddings) is {context}; shorten the prompt or ask "
                             f"for at most {max(context - n, 0)} new tokens")


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Clear errors for prompts that are not integer token ids of the model's vocabulary."""
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}; tokenize the text and pass "
                         "the ids as a long tensor")
    if input_ids.shape[0] == 0:
        raise ValueError(f"input_ids holds no prompts (shape {tuple(input_ids.shape)}); give at least one row")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary (0 to {vocab_size - 1}); "
                         "tokenize with the model's tokenizer and pad with a real token id")


def _prompt_mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("generate needs left padding (padding before each prompt, e.g. a tokenizer with "
                         "padding_side='left'); this attention_mask has padding after real tokens")
    return None if bool(mask.all()) else mask


class _StopChecker:
    """Ends a row once its end token appears or its text contains a stop string."""

    def __init__(self, eos_token_id: int | Iterable[int] | None, stop_strings: Sequence[str] | None,
                 tokenizer: Decoder | None) -> None:
        self.eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) \
            else list(eos_token_id)
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (tokenizer=...) to decode the generated text")
        self.tokenizer = tokenizer

    def __call__(self, token: Tensor, generated: Tensor, done: Tensor) -> Tensor:
        """Rows that end with ``token`` [B]; ``generated`` [B, n] holds their tokens so far."""
        ended = torch.isin(token, torch.tensor(self.eos, device=token.device)) if self.eos else \
            torch.zeros_like(done)
        if self.stop_strings:
            assert self.tokenizer is not None
            for row in (~done & ~ended).nonzero().flatten().tolist():
                text = self.tokenizer.decode(generated[row].tolist())
                if any(stop in text for stop in self.stop_strings):
                    ended[row] = True
        return ended & ~done


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Decoder | None = None,
    seed: int | None = None,
    streamer: object | None = None,
    max_recursions: int | None = None,
    extra_recursions: int = 0,
    cache_implementation: str = "static",
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens after each prompt of ``input_ids`` [B, T] (left-padded when
    ``attention_mask`` marks padding with 0) with a ``MoRForCausalLM``.

    Greedy by default; ``do_sample=True`` samples with ``temperature``/``top_k``/``top_p`` (``seed`` makes it
    repeatable). A row ends at ``eos_token_id`` (an id or several) or once its decoded text contains one of
    ``stop_strings`` (needs ``tokenizer``). ``max_recursions`` caps the depth, ``extra_recursions`` applies
    the block more times to the tokens that reach the last trained step. ``cache_implementation``:
    ``"static"`` (pre-allocated) or ``"paged"``; the results are the same.
    """
    params = SamplingParams(do_sample, temperature, top_k, top_p)
    if cache_implementation not in CACHES:
        raise ValueError(f"cache_implementation must be one of {CACHES}, got {cache_implementation!r}")
    device = model.lm_head.weight.device
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq_len] tensor of token ids, got shape "
                         f"{tuple(input_ids.shape)}; an empty prompt needs at least one token (e.g. BOS/EOS)")
    check_token_ids(input_ids, model.config.vocab_size)
    mask = _prompt_mask(input_ids, attention_mask)
    batch = input_ids.shape[0]
    prompt_lengths = [input_ids.shape[1]] * batch if mask is None else mask.sum(1).tolist()
    check_prompts(prompt_lengths, max_new_tokens, model.config.max_position_embeddings)
    stop = _StopChecker(eos_token_id, stop_strings, tokenizer)

    pad = model.config.pad_token_id or 0
    tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    depths = torch.zeros_like(tokens)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        return GenerationOutput(tokens, lengths, depths)

    capacity = max(prompt_lengths) + max_new_tokens
    if cache_implementation == "static":
        cache = StaticKVCache.for_model(model, batch, capacity, extra_recursions)
    else:
        cache = PagedCache.for_model(model, batch, capacity, extra_recursions=extra_recursions).view(range(batch))
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    forward = dict(routing="causal", cache=cache, max_recursions=max_recursions, extra_recursions=extra_recursions)

    was_training = model.training
    model.eval()
    try:
        out = model(input_ids, attention_mask=mask, **forward)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample(out.logits[:, -1], params, generator).masked_fill(done, pad)
            tokens[:, step] = token
            depths[:, step] = out.depths[:, -1].masked_fill(done, 0)
            lengths += (~done).long()
            if streamer is not None:
                if isinstance(streamer, Streamer):
                    streamer.put(token.cpu(), depths[:, step].cpu())
                else:
                    streamer.put(token.cpu())
            done = done | stop(token, tokens[:, : step + 1], done)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            # Rows that ended are fed as padding: they neither write the cache nor advance.
            chunk_mask = None if not bool(done.any()) else (~done).long()[:, None]
            out = model(token[:, None], attention_mask=chunk_mask, **forward)
    finally:
        model.train(was_training)
        if streamer is not None:
            streamer.end()
    return GenerationOutput(tokens, lengths, depths)
