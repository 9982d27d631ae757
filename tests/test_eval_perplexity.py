"""Validation NLL over packed rows: packing, the paper's per-row mean, token weighting, padding, sources."""

from __future__ import annotations

import json
import lzma
import math

import numpy as np
import pytest
import torch
from helpers import TEXT_VOCAB, CountingLM, bpe_tokenizer, make, sentences, shared_data_dir

from mor.data import load_tokenizer
from mor.eval.perplexity import evaluate_perplexity, pack_rows, shard_rows, text_rows


def test_pack_rows_concatenates_and_drops_the_tail():
    assert list(pack_rows([[1, 2, 3], [4], [5, 6, 7, 8, 9]], 4)) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert list(pack_rows([np.array([1, 2]), torch.tensor([3])], 2)) == [[1, 2]]
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        list(pack_rows([[1, 2]], 1))


def test_text_rows_tokenize_jsonl_xz_documents_with_an_end_of_text_separator(tmp_path):
    tokenizer = load_tokenizer(bpe_tokenizer(tmp_path))
    docs = sentences(30, seed=3)
    docs[4] += " <|endoftext|> is text here"  # read as plain text, as the training data is
    source = tmp_path / "val.jsonl.xz"
    with lzma.open(source, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    stream = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_token_id]]
    assert stream.count(tokenizer.eos_token_id) == len(docs)
    rows = list(text_rows(tokenizer, source, 16))
    assert rows == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    plain = tmp_path / "val.txt"
    plain.write_text("\n".join(docs))
    whole = tokenizer.encode("\n".join(docs)) + [tokenizer.eos_token_id]
    assert list(text_rows(tokenizer, plain, 8)) == [whole[i:i + 8] for i in range(0, len(whole) - 7, 8)]


def test_shard_rows_read_consecutive_rows_of_a_token_stream():
    class Stream:  # the part of mor.data.TokenShards that shard_rows uses
        def __init__(self, n):
            self.tokens = np.arange(n, dtype=np.uint16)

        def __len__(self):
            return self.tokens.size

        def read(self, start, length):
            return self.tokens[start:start + length].copy()

    assert list(shard_rows(Stream(10), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_known_logits_give_the_exact_nll():
    model = CountingLM()
    # row 1: 3 predictions, all hits; row 2: 1 hit, 1 miss
    result = evaluate_perplexity(model, [[1, 2, 3, 4], [7, 8, 20]], batch_size=2, progress=False)
    hit, miss = -model.logprob(True), -model.logprob(False)
    assert result.rows == 2 and result.tokens == 5
    assert result.row_nll == pytest.approx((hit + (hit + miss) / 2) / 2)
    assert result.token_nll == pytest.approx((4 * hit + miss) / 5)
    assert result.ppl == pytest.approx(math.exp(result.token_nll))


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_row_nll_is_the_mean_of_each_rows_lm_loss(routing):
    model = make("expert", vocab_size=TEXT_VOCAB)
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, 300, (n,), generator=generator).tolist() for n in (32, 32, 20, 32, 9)]
    result = evaluate_perplexity(model, rows, num_rows=4, batch_size=3, routing=routing, progress=False)
    with torch.no_grad():
        losses = [model(torch.tensor([r]), labels=torch.tensor([r]), routing=routing).lm_loss.item() for r in rows[:4]]
    assert result.rows == 4 and result.tokens == 31 + 31 + 19 + 31
    assert result.row_nll == pytest.approx(sum(losses) / 4, abs=1e-5)
    weights = [31, 31, 19, 31]
    assert result.token_nll == pytest.approx(sum(w * l for w, l in zip(weights, losses)) / sum(weights), abs=1e-5)
    assert [m.metric for m in result.metrics()] == ["nll", "token_nll", "ppl"]


def test_a_source_shorter_than_one_row_is_an_error():
    with pytest.raises(ValueError, match="no rows to evaluate"):
        evaluate_perplexity(CountingLM(), [], progress=False)


def test_wikitext2_valid_packs_into_the_expected_number_of_rows():
    data = shared_data_dir()
    source, tokenizer_file = data / "eval" / "wikitext2-valid.txt", data / "tokenizers" / "smollm2" / "tokenizer.json"
    if not (source.exists() and tokenizer_file.exists()):
        pytest.skip(f"shared WikiText-2 or SmolLM2 tokenizer not found under {data} (set MOR_DATA_DIR)")
    tokenizer = load_tokenizer(tokenizer_file)
    rows = list(text_rows(tokenizer, source, 2048))
    # 273,868 SmolLM2 tokens (shared/data/README.md) plus one end-of-text
    assert len(rows) == 273_869 // 2048 and all(len(r) == 2048 for r in rows)
    assert rows[0][:4] == tokenizer.encode(source.read_text(encoding="utf-8")[:200])[:4]
