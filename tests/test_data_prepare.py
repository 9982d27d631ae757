"""Token-shard preparation: exact token streams, splits, shards, dtype, idempotency and crash safety."""

import hashlib
import importlib
import json
import lzma
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from helpers import shared_data_dir
from mor.cli import main
from mor.data import DataError, TokenShards, prepare, read_index, sample_tokenizer_path, token_dtype

prepare_module = importlib.import_module("mor.data.prepare")  # the module, which the function shadows in mor.data

WORDS = "the quick brown fox jumps over a lazy dog while seven kings count gold in 1606".split()


def corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def expected_stream(tokenizer_file: Path, docs: list[str], eos: int) -> list[int]:
    """Reference: the library tokenizer directly, one end-of-document token after each document."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    return [i for d in docs for i in tok.encode(d, add_special_tokens=False).ids + [eos]]


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".bin" in p.name)


def test_streams_splits_and_shards_are_exact(tmp_path):
    docs = [json.loads(line)["text"] for line in corpus(tmp_path / "c.jsonl", 20).read_text().splitlines()]
    index = prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), tmp_path / "out", val_fraction=0.25,
                    shard_tokens=100, progress=False)
    val_docs = docs[3::4]  # every 4th document
    train_docs = [d for i, d in enumerate(docs) if i % 4 != 3]
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        shards = TokenShards(tmp_path / "out", split)
        stream = expected_stream(sample_tokenizer_path(), split_docs, 0)
        assert shards.read(0, len(shards)).tolist() == stream
        assert shards.num_documents == len(split_docs) == index["splits"][split]["documents"]
        info = index["splits"][split]
        assert len(info["shards"]) == -(-len(stream) // 100)  # cut every 100 tokens
        for shard in info["shards"]:
            data = (tmp_path / "out" / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == 2 * shard["tokens"]
    assert index["dtype"] == "uint16" and index["tokenizer"]["eos_token_id"] == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == sample_tokenizer_path().read_bytes()


def test_separate_validation_sources_and_literal_eos_text(tmp_path):
    (tmp_path / "t.txt").write_text("a text with <|endoftext|> inside")
    (tmp_path / "v.txt").write_text("held out")
    prepare([tmp_path / "t.txt"], sample_tokenizer_path(), tmp_path / "out", val_sources=[tmp_path / "v.txt"],
            progress=False)
    train = TokenShards(tmp_path / "out").read(0, len(TokenShards(tmp_path / "out")))
    assert (train == 0).sum() == 1 and train[-1] == 0  # the literal string did not become a boundary
    val = TokenShards(tmp_path / "out", "val")
    assert val.read(0, len(val)).tolist() == expected_stream(sample_tokenizer_path(), ["held out"], 0)


def test_dtype_follows_vocabulary_size(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    big = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    (tmp_path / "c.txt").write_text("w1 w65535 w65536 w69999")
    prepare([tmp_path / "c.txt"], tmp_path / "big.json", tmp_path / "out", val_fraction=0, progress=False)
    shards = TokenShards(tmp_path / "out")
    assert shards.dtype == np.uint32 and (tmp_path / "out" / "train-00000.bin").stat().st_size == 5 * 4
    assert shards.read(0, 5).tolist() == [1, 65535, 65536, 69999, 0]


def test_rerun_is_idempotent_and_rebuilds_on_change(tmp_path, capsys):
    corpus(tmp_path / "c.jsonl", 50)
    out = tmp_path / "out"
    first = prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, progress=False)
    snapshot = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    again = prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, progress=True)
    assert again == first and "nothing to do" in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == snapshot  # untouched

    (out / "train-00000.bin").unlink()  # an incomplete folder is rebuilt, identically
    prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {k: v[0] for k, v in snapshot.items()}

    corpus(tmp_path / "c.jsonl", 30, seed=1)  # new content: replaced only when asked, old shards gone
    with pytest.raises(DataError, match="already holds a dataset prepared from other inputs .different sources.; "
                                        "pass --overwrite"):
        prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, progress=False)
    assert read_index(out) == first
    changed = prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, overwrite=True,
                      progress=False)
    assert changed["fingerprint"] != first["fingerprint"] and changed["splits"]["train"]["documents"] == 27


@pytest.mark.slow
def test_workers_give_the_same_bytes(tmp_path):
    corpus(tmp_path / "c.jsonl", 600)
    for workers in (1, 2):
        prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), tmp_path / f"w{workers}", val_fraction=0.05,
                workers=workers, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "w1").iterdir()} == \
           {p.name: p.read_bytes() for p in (tmp_path / "w2").iterdir()}


def test_crash_mid_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    corpus(tmp_path / "old.jsonl", 40)
    corpus(tmp_path / "new.jsonl", 40, seed=1)
    out = tmp_path / "out"
    prepare([tmp_path / "old.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, shard_tokens=64,
            progress=False)

    original = prepare_module.ShardWriter.write
    calls = []

    def crash_on_third_write(self, tokens, documents):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        original(self, tokens, documents)

    monkeypatch.setattr(prepare_module, "_BATCH_DOCUMENTS", 4)
    monkeypatch.setattr(prepare_module.ShardWriter, "write", crash_on_third_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare([tmp_path / "new.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, shard_tokens=64,
                overwrite=True, progress=False)
    assert not (out / "index.json").exists() and shard_files(out) == []  # the old output is gone too
    with pytest.raises(FileNotFoundError, match="no index.json"):
        TokenShards(out)

    monkeypatch.setattr(prepare_module.ShardWriter, "write", original)
    prepare([tmp_path / "new.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, shard_tokens=64,
            progress=False)
    prepare([tmp_path / "new.jsonl"], sample_tokenizer_path(), tmp_path / "fresh", val_fraction=0.1,
            shard_tokens=64, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == \
           {p.name: p.read_bytes() for p in (tmp_path / "fresh").iterdir()}


def test_leftovers_of_a_killed_run_are_refused_then_replaced(tmp_path):
    corpus(tmp_path / "c.jsonl", 40)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000.bin").write_bytes(b"\x01\x00" * 10)  # what a killed run may leave behind
    (out / "train-00001.bin.tmp").write_bytes(b"\x01\x00" * 3)
    (out / "notes.txt").write_text("not ours")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        TokenShards(out)
    prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), out, val_fraction=0.1, progress=False)
    assert shard_files(out) == ["train-00000.bin", "val-00000.bin"] and (out / "notes.txt").exists()
    assert TokenShards(out).read(0, 3).tolist() != [1, 1, 1]


def test_bad_input_writes_nothing(tmp_path):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        prepare([tmp_path / "good.jsonl", tmp_path / "bad.jsonl"], sample_tokenizer_path(), tmp_path / "out",
                val_fraction=0, progress=False)
    assert list((tmp_path / "out").iterdir()) == []

    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt' holds no documents"):
        prepare([tmp_path / "good.jsonl", tmp_path / "empty.txt"], sample_tokenizer_path(), tmp_path / "out",
                progress=False)
    with pytest.raises(DataError, match=r"validation split is empty: 1 documents with val_fraction=0.01"):
        prepare([tmp_path / "good.jsonl"], sample_tokenizer_path(), tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_shards_validate_the_index(tmp_path):
    corpus(tmp_path / "c.jsonl", 40)
    out = tmp_path / "out"
    prepare([tmp_path / "c.jsonl"], sample_tokenizer_path(), out, val_fraction=0, progress=False)
    with pytest.raises(ValueError, match="no val tokens; prepare it with --val-fraction"):
        TokenShards(out, "val")
    data = (out / "train-00000.bin").read_bytes()
    (out / "train-00000.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=f"should hold {len(data)} bytes but is {len(data) - 2} bytes"):
        TokenShards(out)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(dict(index, version=99)))
    with pytest.raises(ValueError, match="not a mor-token-shards v1 index"):
        read_index(out)


def test_cli_prepare_inspect_and_tokenizer_train(tmp_path, capsys):
    corpus(tmp_path / "c.jsonl", 60)
    assert main(["tokenizer", "train", str(tmp_path / "c.jsonl"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert main(["data", "prepare", str(tmp_path / "c.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "out"), "--val-fraction", "0.1"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "out"), "--verify", "--show", "5"]) == 0
    printed = capsys.readouterr().out
    assert "54 documents" in printed and "6 documents" in printed and "all shards match" in printed
    assert main(["data", "prepare", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "out2")]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err


def test_prepares_the_shared_corpus(tmp_path):
    corpus_file = shared_data_dir() / "corpus" / "prose-val.jsonl.xz"
    tokenizer = shared_data_dir() / "tokenizers" / "smollm2"
    if not corpus_file.is_file() or not (tokenizer / "tokenizer.json").is_file():
        pytest.skip(f"shared corpus not found at {shared_data_dir()} (set MOR_DATA_DIR)")
    prepare([corpus_file], tokenizer, tmp_path / "out", val_fraction=0.01, progress=False)
    with lzma.open(corpus_file, "rt", encoding="utf-8") as lines:
        docs = [json.loads(line)["text"] for line in lines]
    train, val = TokenShards(tmp_path / "out"), TokenShards(tmp_path / "out", "val")
    assert train.eos_token_id == 0 and train.vocab_size == 49152
    assert (train.num_documents, val.num_documents) == (len(docs) - len(docs) // 100, len(docs) // 100)
    assert val.read(0, len(val)).tolist() == expected_stream(tokenizer / "tokenizer.json", docs[99::100], 0)
    stream = expected_stream(tokenizer / "tokenizer.json", docs[:60], 0)
    assert train.read(0, len(stream)).tolist() == stream
