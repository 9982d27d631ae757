"""Shared helpers for the evaluation tests: tiny tokenizers and models, a model with known logits (no tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from mor import MoRConfig, MoRForCausalLM
from mor.data import train_tokenizer

VOCAB = 300
WORDS = ("the river runs past an old mill while seven quick foxes jump over lazy dogs and a king counts "
         "his gold in the tower as rain falls on green hills near the quiet sea").split()

VARIANTS = {
    "vanilla": {},
    "expert": dict(sharing="middle_cycle", num_recursions=3, router="expert"),
    "token": dict(sharing="middle_cycle", num_recursions=3, router="token"),
}


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(count)]


def bpe_tokenizer(folder: Path) -> Path:
    """A 300-token byte-level BPE trained on random sentences; returns the tokenizer.json path."""
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(200)))
    return train_tokenizer([corpus], VOCAB, folder / "tokenizer.json", progress=False).path


def tiny_model(variant: str = "expert", seed: int = 0, **overrides) -> MoRForCausalLM:
    torch.manual_seed(seed)
    return MoRForCausalLM(MoRConfig.from_preset("tiny", vocab_size=VOCAB, **VARIANTS[variant], **overrides)).eval()


def word_tokenizer(size: int = 100) -> Tokenizer:
    """Whitespace-separated words ``w1 .. w{size-1}`` with ids 1.. and ``<|endoftext|>`` = 0."""
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


class CountingLM(torch.nn.Module):
    """A language model with known logits: after token ``t`` it puts ``margin`` on ``t + 1`` and 0 elsewhere,
    so ``log P(t + 1 | ..., t) = margin - log(e^margin + V - 1)`` and every other token gets ``-log(e^margin + V - 1)``.
    """

    def __init__(self, vocab_size: int = 100, margin: float = 5.0, max_position_embeddings: int = 64) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                                      eos_token_id=0, pad_token_id=0, router="none")
        self.margin = margin
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.calls: list[dict] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        self.calls.append({"shape": tuple(input_ids.shape), "attention_mask": attention_mask, **kwargs})
        nxt = (input_ids + 1) % self.config.vocab_size
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size) + self.anchor
        return SimpleNamespace(logits=logits.scatter(-1, nxt[..., None], self.margin))

    def logprob(self, hit: bool) -> float:
        log_z = torch.logsumexp(torch.tensor([self.margin] + [0.0] * (self.config.vocab_size - 1)), 0).item()
        return (self.margin if hit else 0.0) - log_z
