"""Zero/few-shot tasks: request shapes, metrics (acc, acc_norm, greedy LAMBADA, partial WinoGrande), stderr,
few-shot draws and the shared eval files."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from helpers import CountingLM, shared_data_dir, word_tokenizer, words

from mor import MoRConfig, MoRForCausalLM
from mor.data import load_tokenizer
from mor.eval.results import mean_stderr
from mor.eval.tasks import (TASKS, Task, build_requests, evaluate_task, fewshot_indices, item_scores, load_docs,
                            resolve_tasks)

CHOICE = Task("choice", "-", "choice")
PARTIAL = Task("partial", "-", "partial")
LAMBADA = Task("lambada_like", "-", "lambada")


def values(metrics) -> dict[str, float]:
    return {m.metric: m.value for m in metrics}


def test_mean_stderr_is_the_sample_standard_error():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0]
    mean, stderr = mean_stderr(scores)
    assert mean == pytest.approx(0.6)
    assert stderr == pytest.approx(statistics.stdev(scores) / math.sqrt(5))
    assert stderr == pytest.approx(math.sqrt(0.6 * 0.4 * 5 / 4 / 5))  # (n-1) in the variance, not n
    assert mean_stderr([1.0]) == (1.0, None)
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    assert stderr == pytest.approx(lm_metrics.mean_stderr(scores))


def test_choice_task_picks_the_answer_the_model_prefers():
    # The model predicts "next id = id + 1": the gold continuation counts on from the query.
    docs = [{"query": words(1, 2, 3), "choices": [words(7, 9), words(4, 5), words(60)], "gold": 1},
            {"query": words(20, 21), "choices": [words(22, 23, 24), words(40, 23, 24)], "gold": 0}]
    metrics = evaluate_task(CountingLM(), word_tokenizer(), CHOICE, docs=docs, progress=False)
    assert values(metrics) == {"acc": 1.0, "acc_norm": 1.0}
    wrong = [dict(doc, gold=(doc["gold"] + 1) % len(doc["choices"])) for doc in docs]
    assert values(evaluate_task(CountingLM(), word_tokenizer(), CHOICE, docs=wrong, progress=False)) == {
        "acc": 0.0, "acc_norm": 0.0}
    assert all(m.n == 2 and m.num_fewshot == 0 and m.routing is None for m in metrics)


def test_acc_norm_divides_by_the_choice_length_in_characters_as_lm_eval():
    doc = {"query": "q", "choices": ["ab", "abcdef", "éé"], "gold": 1}
    # totals -3, -6.6, -2.5: per character -1.5, -1.1, -1.25; per UTF-8 byte "éé" would be -0.625
    scores = item_scores(CHOICE, doc, [(-3.0, False), (-6.6, False), (-2.5, False)])
    assert scores == {"acc": 0.0, "acc_norm": 1.0}


def test_winogrande_scores_only_the_shared_continuation_after_each_option():
    tokenizer, model = word_tokenizer(), CountingLM()
    # Option 0's own words are unlikely (3 misses) but the continuation follows it; option 1 reads well (2 misses
    # in the whole sentence) but the continuation does not follow it. Partial scoring must pick option 0.
    doc = {"context_options": [words(50, 3, 90, 4), words(1, 2, 3, 9)], "continuation": words(5, 6), "gold": 0}
    assert build_requests(PARTIAL, [doc], 0) == [(words(50, 3, 90, 4) + " ", words(5, 6)),
                                                 (words(1, 2, 3, 9) + " ", words(5, 6))]
    assert values(evaluate_task(model, tokenizer, PARTIAL, docs=[doc], progress=False)) == {"acc": 1.0}
    assert TASKS["winogrande"].kind == "partial"


def test_lambada_needs_every_continuation_token_greedy_and_reports_ppl():
    model = CountingLM()
    docs = [{"context": words(10, 11), "continuation": words(12, 13)},
            {"context": words(30, 31), "continuation": words(32, 40)}]  # first token right, second wrong
    metrics = values(evaluate_task(model, word_tokenizer(), LAMBADA, docs=docs, progress=False))
    hit, miss = model.logprob(True), model.logprob(False)
    assert metrics["acc"] == 0.5
    assert metrics["ppl"] == pytest.approx(math.exp(-((2 * hit) + (hit + miss)) / 2))


def test_fewshot_draws_exclude_the_item_and_depend_only_on_seed_and_index():
    for index in range(6):
        picks = fewshot_indices(6, index, 5, seed=1)
        assert sorted(picks) == [i for i in range(6) if i != index]
    assert fewshot_indices(100, 7, 3, seed=1) == fewshot_indices(100, 7, 3, seed=1)
    assert any(fewshot_indices(100, i, 3, seed=1) != fewshot_indices(100, i, 3, seed=2) for i in range(5))
    with pytest.raises(ValueError, match="3-shot needs at least 4 items"):
        fewshot_indices(3, 0, 3, seed=1)


def test_fewshot_prompt_is_solved_demonstrations_then_the_item():
    task = Task("qa", "-", "choice", delimiter="\nAnswer: ")
    docs = [{"query": f"Question {i}?", "choices": [f"no{i}", f"yes{i}"], "gold": 1} for i in range(4)]
    requests = build_requests(task, docs, 2, num_fewshot=2, seed=0)
    demos = [f"Question {j}?\nAnswer: yes{j}\n\n" for j in fewshot_indices(4, 2, 2, seed=0)]
    assert requests == [("".join(demos) + "Question 2?\nAnswer: ", "no2"),
                        ("".join(demos) + "Question 2?\nAnswer: ", "yes2")]
    assert "Question 2?" not in "".join(demos)


def test_resolve_tasks_groups_aliases_and_errors():
    assert [t.name for t in resolve_tasks("lambada_openai, obqa,lambada")] == ["lambada", "openbookqa"]
    assert [t.name for t in resolve_tasks("paper")] == ["lambada", "hellaswag", "piqa", "winogrande", "arc_easy",
                                                        "arc_challenge"]
    assert len(resolve_tasks("all")) == len(TASKS)
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        resolve_tasks("mmlu")


ITEMS = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "piqa": 1838, "openbookqa": 500, "copa": 100,
         "siqa": 1954, "lambada": 5153, "winogrande": 1267, "hellaswag": 10042}


@pytest.fixture(scope="module")
def smollm_tiny():
    """A tiny random expert-choice model over the SmolLM2 vocabulary, with that tokenizer."""
    tokenizer_file = shared_data_dir() / "tokenizers" / "smollm2" / "tokenizer.json"
    if not tokenizer_file.exists():
        pytest.skip(f"SmolLM2 tokenizer not found under {shared_data_dir()} (set MOR_DATA_DIR)")
    torch.manual_seed(0)
    model = MoRForCausalLM(MoRConfig.from_preset("tiny", vocab_size=49152, sharing="middle_cycle",
                                                 num_recursions=2, router="expert", max_position_embeddings=1024))
    return model.eval(), load_tokenizer(tokenizer_file).backend


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shared_eval_files_load_and_score(name, smollm_tiny):
    task = TASKS[name]
    if not (shared_data_dir() / "eval" / task.filename).exists():
        pytest.skip(f"shared eval data not found under {shared_data_dir()} (set MOR_DATA_DIR)")
    docs = load_docs(task, shared_data_dir())
    assert len(docs) == ITEMS[name]
    model, tokenizer = smollm_tiny
    metrics = evaluate_task(model, tokenizer, task, routing="topk", limit=2, num_fewshot=1, docs=docs,
                            progress=False)
    expected = {"choice": {"acc", "acc_norm"}, "partial": {"acc"}, "lambada": {"acc", "ppl"}}[task.kind]
    assert {m.metric for m in metrics} == expected
    assert all(m.n == 2 and m.num_fewshot == 1 and m.routing == "topk" for m in metrics)
    assert all(0.0 <= m.value <= 1.0 for m in metrics if m.metric != "ppl")
