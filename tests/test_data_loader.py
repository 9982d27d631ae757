"""Packed batches: rows, shuffling, rank sharding, exact resume, evaluation rows, document ids."""

import json
import random

import numpy as np
import pytest
import torch

from mor.data import PackedBatches, TokenShards, document_ids, prepare, sample_tokenizer_path, sequential_batches

SEQ = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> TokenShards:
    """About 2,000 tokens of short documents over several shards: 100+ rows of 16."""
    root = tmp_path_factory.mktemp("packed")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(150)]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([root / "c.jsonl"], sample_tokenizer_path(), root / "out", val_fraction=0.1, shard_tokens=500,
            progress=False)
    return TokenShards(root / "out")


def row_numbers(shards: TokenShards, batch: dict) -> list[int]:
    """Which row of the stream each batch row is (rows are distinct enough to identify)."""
    stream = shards.read(0, len(shards) // SEQ * SEQ).reshape(-1, SEQ)
    return [int(np.flatnonzero((stream == row.numpy()).all(axis=1))[0]) for row in batch["input_ids"]]


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def test_shards_read_across_boundaries(shards):
    parts = [np.fromfile(shards.path / s["file"], dtype=np.uint16) for s in shards.index["splits"]["train"]["shards"]]
    assert len(parts) > 2
    whole = np.concatenate(parts)
    assert len(shards) == whole.size
    for start, length in [(0, 10), (495, 10), (490, 1100), (whole.size - 7, 7)]:
        assert shards.read(start, length).tolist() == whole[start:start + length].tolist()
    with pytest.raises(IndexError):
        shards.read(whole.size - 3, 4)


def test_rows_are_packed_windows_visited_once_per_epoch(shards):
    loader = PackedBatches(shards, SEQ, batch_size=4, seed=0)
    num_rows = len(shards) // SEQ
    assert loader.batches_per_epoch == num_rows // 4
    epoch = take(loader, loader.batches_per_epoch)
    for batch in epoch[:3]:
        assert batch["input_ids"].shape == (4, SEQ) and batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["labels"], batch["input_ids"])
    seen = [r for batch in epoch for r in row_numbers(shards, batch)]
    assert len(set(seen)) == len(seen) == num_rows // 4 * 4
    assert seen != sorted(seen)  # shuffled
    next_epoch = [r for batch in take(loader, loader.batches_per_epoch) for r in row_numbers(shards, batch)]
    assert loader.epoch == 1 and len(set(next_epoch)) == len(next_epoch) and next_epoch != seen


def test_shuffle_is_determined_by_the_seed(shards):
    a = take(PackedBatches(shards, SEQ, 4, seed=7), 5)
    b = take(PackedBatches(shards, SEQ, 4, seed=7), 5)
    c = take(PackedBatches(shards, SEQ, 4, seed=8), 5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(a, c))


def test_ranks_split_the_single_process_global_batch(shards):
    world, per_rank = 3, 2
    single = PackedBatches(shards, SEQ, per_rank * world, seed=3)
    ranks = [PackedBatches(shards, SEQ, per_rank, seed=3, rank=r, world_size=world) for r in range(world)]
    assert ranks[0].batches_per_epoch == single.batches_per_epoch
    for _ in range(single.batches_per_epoch + 2):  # across an epoch boundary
        parts = [next(loader)["input_ids"] for loader in ranks]
        assert torch.equal(torch.cat(parts), next(single)["input_ids"])  # rank r holds rows [r*B, (r+1)*B)


@pytest.mark.parametrize("next_epoch", [False, True])
def test_resume_continues_exactly(shards, next_epoch):
    loader = PackedBatches(shards, SEQ, 16, seed=1, document_masking=True)
    take(loader, loader.batches_per_epoch + 2 if next_epoch else 3)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
    expected = take(loader, 6)
    fresh = PackedBatches(shards, SEQ, 16, seed=1, document_masking=True)
    fresh.load_state_dict(state)
    for want, got in zip(expected, take(fresh, 6)):
        assert all(torch.equal(want[k], got[k]) for k in ("input_ids", "labels", "document_ids"))
    # Another world size with the same global batch resumes at the same rows.
    halves = [PackedBatches(shards, SEQ, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    assert torch.equal(torch.cat([next(h)["input_ids"] for h in halves]), expected[0]["input_ids"])
    with pytest.raises(ValueError, match="seed=1 but this loader has 2"):
        PackedBatches(shards, SEQ, 16, seed=2).load_state_dict(state)


def test_drop_last_false_ends_the_epoch_with_the_remainder(shards):
    num_rows = len(shards) // SEQ
    loader = PackedBatches(shards, SEQ, 32, drop_last=False)
    sizes = [len(b["input_ids"]) for b in take(loader, loader.batches_per_epoch)]
    assert sum(sizes) == num_rows and sizes[-1] == num_rows % 32
    with pytest.raises(ValueError, match="world_size=1"):
        PackedBatches(shards, SEQ, 2, rank=0, world_size=2, drop_last=False)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedBatches(shards, SEQ, num_rows + 1)


def test_sequential_rows_for_evaluation(shards):
    val = TokenShards(shards.path, "val")
    rows = [r for b in sequential_batches(val, SEQ, 3) for r in b["input_ids"].tolist()]
    stream = val.read(0, len(val) // SEQ * SEQ).reshape(-1, SEQ).tolist()
    assert rows == stream
    assert [r for b in sequential_batches(val, SEQ, 3, max_rows=4) for r in b["input_ids"].tolist()] == stream[:4]
    by_rank = [[r for b in sequential_batches(val, SEQ, 2, rank=k, world_size=2) for r in b["input_ids"].tolist()]
               for k in range(2)]
    assert by_rank[0] == stream[0::2] and by_rank[1] == stream[1::2]


def test_document_ids_count_end_of_document_tokens():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 9], [0, 0, 3, 4, 5, 0]])
    assert document_ids(tokens, 0).tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]


def test_loader_document_ids_follow_the_eos_tokens(shards):
    batch = next(PackedBatches(shards, SEQ, 4, document_masking=True))
    for row, ids in zip(batch["input_ids"].tolist(), batch["document_ids"].tolist()):
        current, expected = 0, []
        for token in row:
            expected.append(current)
            current += token == shards.eos_token_id
        assert ids == expected
    assert "document_ids" not in next(PackedBatches(shards, SEQ, 4))
