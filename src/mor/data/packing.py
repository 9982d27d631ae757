"""Packed batches: fixed-length rows cut from the concatenated token stream of a split.

Row ``j`` is tokens ``[j * seq_len, (j + 1) * seq_len)``; the tail shorter than a row is never used. Documents
run on across row boundaries, separated by their end-of-document tokens. ``labels`` equal ``input_ids``: the
model shifts them (Hugging Face convention).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mor.data.shards import TokenShards

Batch = dict[str, torch.Tensor]


def document_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Per-token document number within each row: 0 up to and including the first end-of-document token,
    then 1, and so on. The end-of-document token belongs to the document it ends. The model attends only within
    equal numbers (``model(input_ids, document_ids=...)``)."""
    is_eos = (input_ids == eos_token_id).long()
    return is_eos.cumsum(dim=-1) - is_eos


def _make_batch(shards: TokenShards, rows: np.ndarray, seq_len: int, document_masking: bool, eos: int) -> Batch:
    tokens = np.stack([shards.read(int(row) * seq_len, seq_len) for row in rows]).astype(np.int64)
    input_ids = torch.from_numpy(tokens)
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if document_masking:
        batch["document_ids"] = document_ids(input_ids, eos)
    return batch


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class PackedBatches:
    """Endless, shuffled, rank-sharded batches of packed rows, resumable at the exact batch.

    Each epoch visits the rows in a fresh order drawn from ``(seed, epoch)``. A *global batch* is the next
    ``batch_size * world_size`` rows of that order; rank ``r`` takes its ``r``-th contiguous block of
    ``batch_size`` rows. So ranks see disjoint rows, and concatenating the ranks' batches in rank order gives
    exactly the batch of one process with ``batch_size * world_size``. With ``drop_last`` an epoch ends at the
    last full global batch (the left-over rows change every epoch); without it (one process only) the epoch
    ends with a smaller batch.

    Batches are dicts of LongTensors ``[B, T]``: ``input_ids``, ``labels`` (equal to ``input_ids``) and, with
    ``document_masking``, ``document_ids`` (see :func:`document_ids`).
    """

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, document_masking: bool = False, eos_token_id: int | None = None,
                 drop_last: bool = True) -> None:
        _check_rank(rank, world_size)
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not drop_last and world_size > 1:
            raise ValueError("drop_last=False would give ranks unequal batches; use it with world_size=1")
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.document_masking = document_masking
        self.eos_token_id = shards.eos_token_id if eos_token_id is None else eos_token_id
        self.num_rows = len(shards) // seq_len
        self.global_batch_size = batch_size * world_size
        if self.num_rows < self.global_batch_size and drop_last:
            raise ValueError(f"{shards.split} has {len(shards):,} tokens = {self.num_rows} rows of {seq_len}, "
                             f"fewer than one global batch of {self.global_batch_size} rows; use more data or "
                             f"a smaller seq_len/batch_size")
        if self.num_rows == 0:
            raise ValueError(f"{shards.split} has {len(shards):,} tokens, fewer than one row of {seq_len}")
        self.epoch = 0
        self.step = 0  # global batches already yielded in this epoch
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_rows, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        return self._order

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> Batch:
        if self.step == self.batches_per_epoch:
            self.epoch, self.step, self._order = self.epoch + 1, 0, None
        start = self.step * self.global_batch_size + self.rank * self.batch_size
        rows = self._epoch_order()[start:start + self.batch_size]
        self.step += 1
        return _make_batch(self.shards, rows, self.seq_len, self.document_masking, self.eos_token_id)

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch and global batch) plus what must match on resume. Rank-independent, so any
        world size with the same global batch size can resume from it."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "global_batch_size", "num_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved data position has {key}={state[key]} but this loader "
                                 f"has {getattr(self, key)}; use the same data, seed, seq_len and global batch")
        self.epoch, self.step, self._order = int(state["epoch"]), int(state["step"]), None


def sequential_batches(shards: TokenShards, seq_len: int, batch_size: int, max_rows: int | None = None,
                       rank: int = 0, world_size: int = 1, document_masking: bool = False,
                       eos_token_id: int | None = None) -> Iterator[Batch]:
    """The first ``max_rows`` rows (all by default) in order, for evaluation: rank ``r`` gets rows
    ``r, r + world_size, ...`` in batches of up to ``batch_size``. Same batch format as :class:`PackedBatches`."""
    _check_rank(rank, world_size)
    num_rows = len(shards) // seq_len
    if num_rows == 0:
        raise ValueError(f"{shards.split} has {len(shards):,} tokens, fewer than one row of {seq_len}")
    rows = np.arange(rank, num_rows if max_rows is None else min(max_rows, num_rows), world_size)
    eos = shards.eos_token_id if eos_token_id is None else eos_token_id
    for start in range(0, rows.size, batch_size):
        yield _make_batch(shards, rows[start:start + batch_size], seq_len, document_masking, eos)
