"""lm-evaluation-harness (0.4.x) model ``mor``: any lm-eval task on a mor checkpoint.

Importing this module registers the model; ``mor lm-eval`` (or ``python -m mor.eval.harness``) does that and
then runs lm-eval's command line::

    mor lm-eval --model mor --model_args pretrained=CKPT,routing=topk --tasks hellaswag,lambada_openai

Model arguments: ``pretrained`` (checkpoint directory, or a model object in Python), ``tokenizer`` (a
``tokenizer.json`` path or a ``tokenizers.Tokenizer``; default: the checkpoint's), ``routing`` (``topk`` or
``causal``; default: the model's evaluation mode), ``dtype``, ``max_length``, plus lm-eval's ``batch_size`` and
``device``. Scoring goes through :func:`mor.eval.scoring.loglikelihoods`, so lm-eval and ``mor eval`` agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from mor.data.tokenizer import load_tokenizer
from mor.eval.scoring import eos_token_id, loglikelihoods, model_device, pad_token_id, routing_kwargs
from mor.pretrained import load_model_and_tokenizer, resolve_device

logger = logging.getLogger(__name__)


@register_model("mor")
class MoRLM(TemplateLM):
    def __init__(
        self,
        pretrained: str | Path | torch.nn.Module,
        tokenizer: str | Path | Tokenizer | None = None,
        routing: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,  # accepted for lm-eval's interface; batches have a fixed size
        device: str | None = None,
        dtype: str = "auto",
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if routing not in (None, "topk", "causal"):
            raise ValueError(f"routing must be 'topk' or 'causal', got {routing!r}")
        device = resolve_device(device or "auto")
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("a model object needs its tokenizer: pass tokenizer=<tokenizer.json or Tokenizer>")
            self.model = pretrained.eval()
            self._tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer).backend
        else:
            self.model, text_tokenizer = load_model_and_tokenizer(pretrained, tokenizer, device, dtype)
            self._tokenizer = text_tokenizer.backend
        if routing is None and self.model.config.router != "none":
            routing = self.model.config.routing_mode_eval  # scoring and generation follow the same mode
        self.routing = routing
        self._device = model_device(self.model)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self.batch_size = _batch_size(batch_size)

    # ------------------------------------------------------------------ tokenization
    @property
    def eot_token_id(self) -> int:
        return eos_token_id(self.model)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "mor"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self._tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=False)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests], max_length=self.max_length,
                                 batch_size=self.batch_size, routing=self.routing, pad_id=pad_token_id(self.model),
                                 desc="loglikelihood", progress=not disable_tqdm)
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, over disjoint windows of ``max_length`` tokens (as lm-eval's HF model)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(token_list=self.tok_encode(string),
                                                    prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        scores = loglikelihoods(self.model, windows, max_length=self.max_length, batch_size=self.batch_size,
                                routing=self.routing, pad_id=pad_token_id(self.model), desc="loglikelihood_rolling",
                                progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, scores):
            totals[owner] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, end-of-text or ``max_gen_toks`` tokens: ``model.generate`` (KV
        caches, causal routing) where the model has it, else one full forward per token."""
        outputs = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs)
            if gen_kwargs.pop("do_sample", False) or gen_kwargs.get("temperature", 0.0):
                logger.warning("mor generates greedily; ignoring sampling settings %s", gen_kwargs)
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            text = self._greedy(self.tok_encode(context) or [self.prefix_token_id], max_new, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return outputs

    def _greedy(self, context: list[int], max_new: int, until: list[str]) -> str:
        max_new = min(max_new, self.max_length - 1)
        context = context[-(self.max_length - max_new):]
        if self.routing != "topk" and hasattr(self.model, "generate"):
            # KV-cached decoding in causal routing: the logits of re-running the window, without the re-running.
            out = self.model.generate(torch.tensor([context], device=self._device), max_new_tokens=max_new,
                                      eos_token_id=self.eot_token_id, stop_strings=until, tokenizer=self._tokenizer)
            generated = out.sequences()[0]
        else:
            generated = self._greedy_full_forward(context, max_new, until)
        if generated and generated[-1] == self.eot_token_id:
            generated = generated[:-1]
        text = self.tok_decode(generated)
        for stop in until:
            text = text.split(stop)[0]
        return text

    def _greedy_full_forward(self, context: list[int], max_new: int, until: list[str]) -> list[int]:
        """Greedy tokens from one full forward per token (top-k routing re-selects over the grown sequence)."""
        tokens = list(context)
        for _ in range(max_new):
            logits = self.model(torch.tensor([tokens], device=self._device), **routing_kwargs(self.routing)).logits
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] == self.eot_token_id or any(s in self.tok_decode(tokens[len(context):]) for s in until):
                break
        return tokens[len(context):]


def _batch_size(value: int | str) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        logger.warning("batch_size=%s is not supported by the mor model; using 8", value)
        return 8
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {value}")
    return size
