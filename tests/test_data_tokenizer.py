"""Tokenizers (load, train) and the sample corpus and tokenizer shipped with the package."""

import hashlib
import importlib
import json

import pytest

from helpers import shared_data_dir
from mor.data import (TokenShards, iter_documents, load_tokenizer, prepare_sample, sample_corpus_paths,
                      sample_tokenizer_path, train_tokenizer)

sample_module = importlib.import_module("mor.data.sample")

TEXT = "Numbers 12345 and ünïcödé — «quotes»\n\tindented line, emoji 🙂, <|endoftext|> as text."


def test_train_byte_level_bpe(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"the king {i} and the queen of {i * 7}"}) + "\n"
                                              for i in range(200)))
    tok = train_tokenizer([tmp_path / "c.jsonl"], 320, tmp_path / "tok", progress=False)
    assert tok.path == tmp_path / "tok" / "tokenizer.json" and tok.eos_token_id == 0
    assert 257 < tok.vocab_size <= 320
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte-level: any text round-trips
    assert all(len(tok.decode([i])) == 1 for i in tok.encode("2024"))  # digits never merge
    assert 0 not in tok.encode(TEXT)  # the literal special-token string is text here ...
    assert 0 in tok.backend.encode(TEXT).ids  # ... while the unchanged backend maps it to its id
    again = train_tokenizer([tmp_path / "c.jsonl"], 320, tmp_path / "again.json", progress=False)
    assert again.sha256 == tok.sha256  # deterministic
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        train_tokenizer([tmp_path / "c.jsonl"], 200, tmp_path / "x", progress=False)


def test_load_tokenizer_file_or_folder(tmp_path):
    tok = load_tokenizer(sample_tokenizer_path())
    assert tok.sha256 == hashlib.sha256(sample_tokenizer_path().read_bytes()).hexdigest()
    (tmp_path / "tokenizer.json").write_bytes(sample_tokenizer_path().read_bytes())
    assert load_tokenizer(tmp_path).encode(TEXT) == tok.encode(TEXT)
    with pytest.raises(FileNotFoundError, match="give a tokenizer.json file or a folder"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path, eos_token="<nope>")


def test_smollm2_tokenizer():
    folder = shared_data_dir() / "tokenizers" / "smollm2"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found under {shared_data_dir()} (set MOR_DATA_DIR)")
    tok = load_tokenizer(folder)
    assert (tok.vocab_size, tok.eos_token, tok.eos_token_id) == (49152, "<|endoftext|>", 0)
    assert tok.encode("Hello world") == [19556, 905]  # the value documented with the shared data
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_sample_assets_are_small_and_complete(tmp_path, monkeypatch):
    paths = sample_corpus_paths()
    assets = [paths["train"], paths["val"], sample_tokenizer_path()]
    assert sum(p.stat().st_size for p in assets) < 4 * 2**20
    val = list(iter_documents(paths["val"]))
    assert len(val) == 2 and val[0].startswith("MACBETH") and val[1].startswith("TWELFTH NIGHT")
    assert len(list(iter_documents(paths["train"]))) == 40
    assert load_tokenizer(sample_tokenizer_path()).vocab_size == 4096
    # prepare_sample's wiring, on the small val file in both roles to stay fast.
    monkeypatch.setattr(sample_module, "sample_corpus_paths", lambda: {"train": paths["val"], "val": paths["val"]})
    index = prepare_sample(tmp_path / "sample", progress=False)
    assert index["tokenizer"]["sha256"] == load_tokenizer(sample_tokenizer_path()).sha256
    assert index["splits"]["train"]["tokens"] == index["splits"]["val"]["tokens"]
    assert len(TokenShards(tmp_path / "sample", "val")) == index["splits"]["val"]["tokens"] > 10_000
