"""Validation NLL and perplexity over packed rows of held-out text (MOR_SPEC 10.1).

As the paper: the token stream is packed into rows of ``seq_len`` (2,048) tokens, the first ``num_rows`` rows
are scored with ``labels = input_ids`` (so each row predicts ``seq_len - 1`` tokens), and the reported NLL is
the mean over rows of the per-row mean token cross-entropy. The token-weighted NLL and its perplexity are
reported beside it; they differ only when rows differ in length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mor.data.shards import TokenShards
from mor.data.sources import iter_documents
from mor.data.tokenizer import TextTokenizer
from mor.eval.results import Metric, mean_stderr
from mor.eval.scoring import model_device, routing_kwargs


@dataclass(frozen=True)
class PerplexityResult:
    source: str
    routing: str | None
    rows: int
    tokens: int  # predicted tokens
    row_nll: float  # mean over rows of the per-row mean token NLL (the paper's number)
    row_nll_stderr: float | None
    token_nll: float  # NLL averaged over all predicted tokens
    ppl: float  # exp(token_nll)

    def metrics(self) -> list[Metric]:
        return [Metric(self.source, "nll", self.row_nll, self.row_nll_stderr, self.rows, self.routing),
                Metric(self.source, "token_nll", self.token_nll, None, self.tokens, self.routing),
                Metric(self.source, "ppl", self.ppl, None, self.tokens, self.routing)]


def text_rows(tokenizer: TextTokenizer, source: str | Path, seq_len: int) -> Iterator[list[int]]:
    """Packed rows of a text source (a ``.txt`` file is one document, ``.jsonl[.xz|.gz]`` one document a line;
    see :mod:`mor.data.sources`), tokenized as ``mor data prepare`` does: each document followed by the
    end-of-document token, special-token strings inside the text read as plain text."""
    def token_documents() -> Iterator[list[int]]:
        documents = iter_documents(source)
        while chunk := list(islice(documents, 64)):
            for ids in tokenizer.encode_batch(chunk):
                yield ids + [tokenizer.eos_token_id]

    return pack_rows(token_documents(), seq_len)


def shard_rows(shards: TokenShards, seq_len: int) -> Iterator[list[int]]:
    """Consecutive rows of a prepared split (``mor.data.TokenShards``), already packed as in training."""
    for start in range(0, len(shards) - seq_len + 1, seq_len):
        yield shards.read(start, seq_len).tolist()


def source_rows(source: str | Path, tokenizer: TextTokenizer, seq_len: int, vocab_size: int) -> Iterator[list[int]]:
    """Rows of a prepared token folder (its val split) or of a text source packed with the model's tokenizer."""
    from mor.data.prepare import INDEX_FILE

    if (Path(source) / INDEX_FILE).is_file():
        shards = TokenShards(source, split="val")
        if shards.vocab_size > vocab_size:
            raise ValueError(f"{source} was tokenized with {shards.vocab_size} tokens but the model's vocabulary "
                             f"holds {vocab_size}; use shards made with the model's tokenizer")
        return shard_rows(shards, seq_len)
    return text_rows(tokenizer, source, seq_len)


def pack_rows(token_seqs: Iterable[Sequence[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate token sequences and cut the stream into rows of exactly ``seq_len`` (the tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
    buffer: list[int] = []
    for seq in token_seqs:
        buffer.extend(int(t) for t in seq)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            del buffer[:seq_len]


@torch.inference_mode()
def evaluate_perplexity(
    model: torch.nn.Module,
    rows: Iterable[Sequence[int]],
    *,
    num_rows: int | None = 500,
    batch_size: int = 1,
    routing: str | None = None,
    source: str = "text",
    progress: bool = True,
) -> PerplexityResult:
    """NLL of ``model`` over the first ``num_rows`` token rows (rows may differ in length; shorter rows of a
    batch are right-padded and masked)."""
    rows = islice(rows, num_rows) if num_rows is not None else iter(rows)
    model.eval()
    device = model_device(model)
    row_nlls: list[float] = []
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=num_rows, desc=f"{source} [{routing or 'eval'}]", unit="row", disable=not progress)
    while batch := [list(row) for row in islice(rows, batch_size)]:
        if min(map(len, batch)) < 2:
            raise ValueError("every row needs at least 2 tokens")
        width = max(map(len, batch))
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, row in enumerate(batch):
            input_ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids, attention_mask=mask, **routing_kwargs(routing)).logits
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
        row_sums, counts = nll.sum(1), (targets != -100).sum(1)
        row_nlls.extend((row_sums / counts).tolist())
        total_nll += row_sums.sum().item()
        total_tokens += int(counts.sum())
        bar.update(len(batch))
    bar.close()
    if not row_nlls:
        raise ValueError(f"{source}: no rows to evaluate; the source holds fewer tokens than one row "
                         "(use a longer text or a smaller --seq-len)")
    row_nll, row_stderr = mean_stderr(row_nlls)
    token_nll = total_nll / total_tokens
    return PerplexityResult(source, routing, len(row_nlls), total_tokens, row_nll, row_stderr, token_nll,
                            math.exp(token_nll))
