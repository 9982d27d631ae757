"""The batched log-likelihood scorer: padding, positions, greedy flags, truncation, pair encoding."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from helpers import TEXT_VOCAB, CountingLM, bpe_tokenizer, make, word_tokenizer

from mor.data import load_tokenizer
from mor.eval.scoring import encode_pair, loglikelihoods


def random_requests(count: int, seed: int = 1, vocab: int = 300) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(6, 30))],
             [rng.randrange(1, vocab) for _ in range(rng.randint(1, 5))]) for _ in range(count)]


@pytest.mark.parametrize("variant,routing", [("vanilla", None), ("expert", "topk"), ("expert", "causal"),
                                             ("token", "topk")])
def test_batched_padded_scoring_equals_one_by_one(variant, routing):
    model = make(variant, vocab_size=TEXT_VOCAB)
    requests = random_requests(10)
    batched = loglikelihoods(model, requests, max_length=256, batch_size=4, routing=routing, progress=False)
    alone = loglikelihoods(model, requests, max_length=256, batch_size=1, routing=routing, progress=False)
    torch.testing.assert_close([ll for ll, _ in batched], [ll for ll, _ in alone], atol=2e-5, rtol=0)
    assert [g for _, g in batched] == [g for _, g in alone]


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_scores_are_the_log_softmax_of_the_continuation_positions(routing):
    model = make("expert", vocab_size=TEXT_VOCAB)
    context, continuation = [5, 9, 17, 3, 44, 12, 8], [71, 2, 90]
    full = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(full[:, :-1], routing=routing).logits.log_softmax(-1)[0]
    expected = sum(logprobs[len(context) - 1 + i, tok].item() for i, tok in enumerate(continuation))
    greedy = all(logprobs[len(context) - 1 + i].argmax().item() == tok for i, tok in enumerate(continuation))
    [(ll, is_greedy)] = loglikelihoods(model, [(context, continuation)], max_length=256, routing=routing,
                                       progress=False)
    assert ll == pytest.approx(expected, abs=1e-5)
    assert is_greedy == greedy


def test_known_logits_give_exact_loglikelihoods_and_greedy_flags():
    model = CountingLM()
    requests = [([3, 4, 5], [6, 7]), ([3, 4, 5], [6, 9]), ([10], [12])]
    results = loglikelihoods(model, requests, max_length=64, batch_size=3, progress=False)
    hit, miss = model.logprob(True), model.logprob(False)
    assert results[0] == (pytest.approx(2 * hit), True)
    assert results[1] == (pytest.approx(hit + miss), False)  # first token right is not enough
    assert results[2] == (pytest.approx(miss), False)
    # right padding with a mask: the short rows of the batch are padded after their tokens
    assert model.calls[0]["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_routing_mode_reaches_the_model_and_is_omitted_for_plain_models():
    model = CountingLM()
    loglikelihoods(model, [([1, 2], [3])], max_length=64, routing="causal", progress=False)
    loglikelihoods(model, [([1, 2], [3])], max_length=64, progress=False)
    assert model.calls[0]["routing"] == "causal"
    assert "routing" not in model.calls[1]


def test_long_inputs_lose_tokens_from_the_left_with_a_warning(caplog):
    model = make("expert", vocab_size=TEXT_VOCAB)
    context, continuation = list(range(1, 31)), [40, 41, 42]
    with caplog.at_level(logging.WARNING, logger="mor.eval.scoring"):
        [truncated] = loglikelihoods(model, [(context, continuation)], max_length=16, routing="topk",
                                     progress=False)
    assert "1 of 1 requests were longer than max_length=16" in caplog.text
    # the model reads the last 16 of the 32 input tokens: 14 context tokens + the first 2 continuation tokens
    [expected] = loglikelihoods(model, [(context[-14:], continuation)], max_length=256, routing="topk",
                                progress=False)
    assert truncated == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="continuation has 20 tokens"):
        loglikelihoods(model, [([1], list(range(1, 21)))], max_length=16, progress=False)


def test_encode_pair_moves_trailing_whitespace_into_the_continuation(tmp_path):
    tokenizer = load_tokenizer(bpe_tokenizer(tmp_path)).backend
    context, continuation = encode_pair(tokenizer, "the old mill\nAnswer: ", "the river", prefix_id=0)
    assert context == tokenizer.encode("the old mill\nAnswer:", add_special_tokens=False).ids
    assert context + continuation == tokenizer.encode("the old mill\nAnswer: the river",
                                                      add_special_tokens=False).ids
    assert tokenizer.decode(continuation) == " the river"
    assert encode_pair(tokenizer, "", "the sea", prefix_id=0) == (
        [0], tokenizer.encode("the sea", add_special_tokens=False).ids)
    assert encode_pair(word_tokenizer(), "w1 w2 ", "w3", prefix_id=0) == ([1, 2], [3])
    # A whitespace-only context conditions on end-of-text and keeps its whitespace in the continuation.
    assert encode_pair(tokenizer, " ", "the sea", prefix_id=0) == (
        [0], tokenizer.encode(" the sea", add_special_tokens=False).ids)


def test_an_empty_context_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="context is empty"):
        loglikelihoods(make("vanilla", vocab_size=TEXT_VOCAB), [([], [7]), ([1, 2, 3], [4])], max_length=32, progress=False)
