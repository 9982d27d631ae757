"""The lm-evaluation-harness model "mor": offline tasks from local JSON files agree with mor's own scorer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TEXT_VOCAB, CountingLM, bpe_tokenizer, make, sentences, word_tokenizer, words

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mor.data import load_tokenizer  # noqa: E402
from mor.eval.harness import main as harness_main  # noqa: E402
from mor.eval.harness import with_device  # noqa: E402
from mor.eval.lm_eval_adapter import MoRLM  # noqa: E402
from mor.eval.scoring import encode_pair, loglikelihoods  # noqa: E402
from mor.eval.tasks import Task, evaluate_task  # noqa: E402

TASK_YAML = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny expert-choice checkpoint with its tokenizer, and a multiple-choice task read from local JSON."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer_file = bpe_tokenizer(root)
    ckpt = root / "ckpt"
    make("expert", vocab_size=TEXT_VOCAB).save_pretrained(ckpt)
    shutil.copy(tokenizer_file, ckpt / "tokenizer.json")
    texts = sentences(12, seed=5)
    docs = [{"query": texts[i], "choices": [texts[i + 1], texts[i + 2][:20], texts[i + 3][:9]], "gold": i % 3}
            for i in range(0, 9, 1)]
    data = root / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    return {"ckpt": ckpt, "docs": docs, "tasks": tasks, "tokenizer": load_tokenizer(tokenizer_file).backend}


def test_simple_evaluate_agrees_with_mor_scoring(setup):
    results = lm_eval.simple_evaluate(
        model="mor", model_args={"pretrained": str(setup["ckpt"]), "routing": "topk", "device": "cpu"},
        tasks=["tiny_choice"], batch_size=4, log_samples=True,
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False))
    scores = results["results"]["tiny_choice"]
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(scores)
    assert results["config"]["model"] == "mor"

    model = MoRLM(str(setup["ckpt"]), routing="topk").model
    samples = sorted(results["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == len(setup["docs"])
    for sample in samples:
        requests = [encode_pair(setup["tokenizer"], ctx, cont, 0) for ctx, cont in sample["arguments"]]
        ours = loglikelihoods(model, requests, max_length=256, routing="topk", progress=False)
        theirs = [resp[0] for resp in sample["resps"]]
        assert [ll for ll, _ in theirs] == pytest.approx([ll for ll, _ in ours], abs=1e-5)

    own = {m.metric: m for m in evaluate_task(model, setup["tokenizer"], Task("tiny_choice", "-", "choice"),
                                              routing="topk", docs=setup["docs"], progress=False)}
    assert scores["acc,none"] == pytest.approx(own["acc"].value)
    assert scores["acc_norm,none"] == pytest.approx(own["acc_norm"].value)
    assert scores["acc_stderr,none"] == pytest.approx(own["acc"].stderr)


def test_rolling_loglikelihood_of_a_short_text_is_its_loglikelihood_after_end_of_text(setup):
    lm = MoRLM(str(setup["ckpt"]), routing="causal", device="cpu")
    text = setup["docs"][0]["query"]
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    tokens = setup["tokenizer"].encode(text, add_special_tokens=False).ids
    [(expected, _)] = loglikelihoods(lm.model, [([0], tokens)], max_length=256, routing="causal", progress=False)
    assert rolling == pytest.approx(expected, abs=1e-5)


def test_rolling_windows_cover_every_token_of_a_long_text():
    model = CountingLM(max_position_embeddings=8)
    lm = MoRLM(model, tokenizer=word_tokenizer())
    text = words(*range(5, 24))  # 19 tokens, windows of 8
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    # every token but the first (after end-of-text) follows its predecessor
    assert total == pytest.approx(model.logprob(False) + 18 * model.logprob(True))


def test_generate_until_decodes_greedily_and_stops():
    lm = MoRLM(CountingLM(), tokenizer=word_tokenizer())
    requests = [Instance("generate_until", {}, (words(1, 2), {"until": ["w6"], "max_gen_toks": 10}), 0),
                Instance("generate_until", {}, (words(1, 2), {"until": ["w90"], "max_gen_toks": 3}), 1)]
    assert lm.generate_until(requests, disable_tqdm=True) == ["w3 w4 w5 ", "w3 w4 w5"]


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_mor_model_on_the_device_that_exists(setup, tmp_path):
    # No --device: lm-eval's own default (cuda:0) crashed on machines without a GPU.
    out = tmp_path / "out"
    code = harness_main(["--model", "mor", "--model_args", f"pretrained={setup['ckpt']},routing=causal",
                         "--tasks", "tiny_choice", "--include_path", str(setup["tasks"]),
                         "--batch_size", "4", "--limit", "3", "--output_path", str(out)])
    assert code == 0
    [written] = Path(out).rglob("results_*.json")
    results = json.loads(written.read_text())
    assert results["results"]["tiny_choice"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert results["config"]["model_args"] == {"pretrained": str(setup["ckpt"]), "routing": "causal"}
    assert results["config"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_device_or_config_given_to_lm_eval_is_kept():
    for argv in (["--device", "cuda:1"], ["--device=cpu"], ["--config", "run.yaml"], ["-C", "run.yaml"]):
        assert with_device(["--model", "mor", *argv]) == ["--model", "mor", *argv]


def test_a_task_dataset_out_of_reach_is_one_line_that_says_what_to_do(monkeypatch, capsys):
    def offline():
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", offline)
    assert harness_main(["--model", "mor", "--tasks", "piqa"]) == 1
    assert capsys.readouterr().err.startswith("mor lm-eval: Couldn't reach 'baber/piqa' on the Hub "
                                              "(LocalEntryNotFoundError). lm-eval's tasks download their data")


def test_lm_eval_help_names_the_mor_model(capsys):
    assert harness_main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--model mor --model_args pretrained=CHECKPOINT" in help_text
    assert "--tasks" in help_text  # lm-eval's own help follows


def test_generate_until_with_kv_cached_generate_matches_full_forward_decoding():
    # larger initial weights than usual, so that greedy decoding does not just repeat one token
    lm = MoRLM(make("expert", vocab_size=TEXT_VOCAB, initializer_range=0.2), tokenizer=word_tokenizer(300), routing="causal")
    assert hasattr(lm.model, "generate")  # generate_until takes the KV-cached path
    prompt = words(5, 17, 33, 4, 90, 61)
    full = lm._greedy_full_forward(lm.tok_encode(prompt), 12, until=[])
    assert len(set(full)) > 6 and lm.eot_token_id not in full
    request = Instance("generate_until", {}, (prompt, {"until": ["w999"], "max_gen_toks": 12}), 0)
    assert lm.generate_until([request], disable_tqdm=True) == [lm.tok_decode(full)]
    stop = lm.tok_decode(full[4:5])
    request = Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)
    assert lm.generate_until([request], disable_tqdm=True) == [lm.tok_decode(full[:4]) + " "]
