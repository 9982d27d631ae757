"""``mor eval``: a checkpoint directory in, a Markdown table and a JSON file of metrics out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import TEXT_VOCAB, bpe_tokenizer, make, sentences

from mor.cli import main


@pytest.fixture
def workspace(tmp_path):
    """A tiny expert-choice checkpoint (tokenizer inside) and a data folder with COPA- and LAMBADA-like files."""
    tokenizer = bpe_tokenizer(tmp_path)
    ckpt = tmp_path / "ckpt"
    make("expert", vocab_size=TEXT_VOCAB).save_pretrained(ckpt)
    shutil.copy(tokenizer, ckpt / "tokenizer.json")
    texts = sentences(40, seed=7)
    (tmp_path / "data" / "eval").mkdir(parents=True)
    (tmp_path / "data" / "eval" / "copa.jsonl").write_text("".join(
        json.dumps({"id": f"copa/{i}", "query": texts[i], "choices": [texts[i + 1], texts[i + 2]], "gold": i % 2})
        + "\n" for i in range(6)))
    (tmp_path / "data" / "eval" / "lambada_openai.jsonl").write_text("".join(
        json.dumps({"id": f"lambada_openai/{i}", "context": t.rsplit(" ", 1)[0], "continuation": t.rsplit(" ", 1)[1]})
        + "\n" for i, t in enumerate(texts[:6])))
    (tmp_path / "val.txt").write_text("\n".join(texts))
    return tmp_path


def test_eval_writes_both_routing_modes_for_tasks_and_perplexity(workspace, capsys):
    out = workspace / "results.json"
    code = main(["eval", str(workspace / "ckpt"), "--tasks", "copa,lambada", "--limit", "4", "--num-fewshot", "1",
                 "--data-dir", str(workspace / "data"), "--perplexity", str(workspace / "val.txt"),
                 "--perplexity-rows", "3", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    rows = {(r["task"], r["routing"], r["metric"]): r for r in results["results"]}
    for routing in ("topk", "causal"):
        assert rows[("copa", routing, "acc")]["n"] == 4
        assert rows[("copa", routing, "acc_norm")]["num_fewshot"] == 1
        assert {"acc", "ppl"} <= {m for t, r, m in rows if t == "lambada" and r == routing}
        assert rows[("val.txt", routing, "nll")]["n"] == 3
        assert rows[("val.txt", routing, "token_nll")]["n"] == 3 * 31
    assert results["model_config"]["router"] == "expert"
    assert results["settings"]["limit"] == 4
    table = capsys.readouterr().out
    assert "| copa | topk | 1 | acc |" in table and "| val.txt | causal | 0 | nll |" in table


def test_eval_explains_bad_invocations(workspace, capsys):
    ckpt = str(workspace / "ckpt")
    for argv, message in [([], "nothing to evaluate"),
                          (["--tasks", "nope"], "unknown task 'nope'"),
                          (["--tasks", "copa", "--data-dir", str(workspace)], "copa.jsonl does not exist"),
                          (["--perplexity", str(workspace / "missing.txt")], "does not exist")]:
        assert main(["eval", ckpt, "--device", "cpu", *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a usage error, before the checkpoint is loaded
        main(["eval", ckpt, "--device", "cpu", "--tasks", "copa", "--limit", "0"])
    assert exit_.value.code == 2 and "argument --limit: must be at least 1, got 0" in capsys.readouterr().err
    (workspace / "ckpt" / "tokenizer.json").unlink()
    assert main(["eval", ckpt, "--tasks", "copa", "--device", "cpu"]) == 2
    assert "holds no tokenizer.json; pass the tokenizer" in capsys.readouterr().err


def test_prepared_token_folder_scores_like_the_text_it_was_made_from(workspace):
    from mor.data import prepare

    prepare([workspace / "val.txt"], workspace / "tokenizer.json", workspace / "prepared",
            val_sources=[workspace / "val.txt"], progress=False)
    results = {}
    for name, source in (("text", workspace / "val.txt"), ("shards", workspace / "prepared")):
        out = workspace / f"{name}.json"
        assert main(["eval", str(workspace / "ckpt"), "--perplexity", str(source), "--perplexity-rows", "4",
                     "--seq-len", "24", "--routing", "topk", "--device", "cpu", "--out", str(out)]) == 0
        [nll] = [r for r in json.loads(out.read_text())["results"] if r["metric"] == "nll"]
        results[name] = nll
    assert results["shards"]["n"] == results["text"]["n"] == 4
    assert results["shards"]["value"] == pytest.approx(results["text"]["value"], abs=1e-6)


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_transformers_backend_scores_an_original_like_its_import(workspace, capsys, source):
    """``--transformers`` scores a Hugging Face folder or a GGUF file with transformers itself: the reference
    numbers of an original model, equal to those of its import as a vanilla MoR checkpoint."""
    transformers = pytest.importorskip("transformers")
    from test_interop import ROPE_THETA, write_gguf

    from mor.interop import load_hf_llama

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=TEXT_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=ROPE_THETA, eos_token_id=[0, 1])
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(workspace / "hf")
    original = workspace / "hf"
    if source == "gguf":
        pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate installed")
        write_gguf(hf, workspace / "model.gguf")  # skips without the gguf package
        original = workspace / "model.gguf"
    load_hf_llama(workspace / "hf").save_pretrained(workspace / "imported")
    values = {}
    for name, path, extra in (("original", original, ["--transformers"]), ("imported", workspace / "imported", [])):
        out = workspace / f"{name}.json"
        assert main(["eval", str(path), "--tasks", "copa,lambada", "--limit", "4",
                     "--data-dir", str(workspace / "data"), "--perplexity", str(workspace / "val.txt"),
                     "--perplexity-rows", "3", "--seq-len", "32", "--tokenizer", str(workspace / "tokenizer.json"),
                     "--device", "cpu", "--dtype", "float32", "--out", str(out), *extra]) == 0
        values[name] = {(r["task"], r["metric"]): r["value"] for r in json.loads(out.read_text())["results"]}
    assert values["original"].keys() == values["imported"].keys() and ("val.txt", "nll") in values["original"]
    assert values["original"] == pytest.approx(values["imported"], rel=1e-4)

    if source == "gguf":  # a GGUF holds no tokenizer.json to fall back on
        assert main(["eval", str(original), "--transformers", "--tasks", "copa", "--device", "cpu"]) == 2
        assert "holds no tokenizer.json; pass the tokenizer" in capsys.readouterr().err
