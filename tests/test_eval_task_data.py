"""Where the eval tasks come from: each Hugging Face dataset's rows become the items the tasks read (checked
against items written out here in the local files' form: llm-foundry items, some shortened, and the same items as
rows of the Hub datasets), and one option picks the source. No network: the Hub is replaced by a stand-in for
``datasets``."""

from __future__ import annotations

import json
import sys
import types

import pytest

from mor.eval.task_data import TASKS, data_source, load_docs

PIQA_SOLUTION = ("Provide the guinea pig with a cage full of a few inches of bedding made of ripped {} strips, you "
                 "will also need to supply it with a water bottle and a food dish.")
ROOF = ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
        "starts pulling up roofing on a roof."]
ARC = ["Planetary density will decrease.", "Planetary years will become longer.", "Planetary days will become shorter.",
       "Planetary gravity will become stronger."]
OBQA = ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"]
PASSAGE = "Phantom pain sensations are described as perceptions."

# task: (a row of its Hub dataset, the item of the local file)
ROWS = {
    "lambada": ({"text": "I stare at Harlin, his mouth curved in a confident grin, I don't care about signs"},
                {"context": "I stare at Harlin, his mouth curved in a confident grin, I don't care about",
                 "continuation": "signs"}),
    "hellaswag": ({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                   "ctx": "A man is sitting on a roof. he", "endings": ROOF, "label": "3"},
                  {"query": "Roof shingle removal: A man is sitting on a roof. he", "choices": ROOF, "gold": 3}),
    "piqa": ({"goal": "How do I ready a guinea pig cage for it's new occupants?",
              "sol1": PIQA_SOLUTION.format("paper"), "sol2": PIQA_SOLUTION.format("jeans material"), "label": 0},
             {"query": "Question: How do I ready a guinea pig cage for it's new occupants?\n",
              "choices": [PIQA_SOLUTION.format("paper"), PIQA_SOLUTION.format("jeans material")], "gold": 0}),
    "winogrande": ({"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                    "option1": "Sarah", "option2": "Maria", "answer": "2"},
                   {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                                        "Sarah was a much better surgeon than Maria so Maria"],
                    "continuation": "always got the easier cases.", "gold": 1}),
    "arc_challenge": ({"question": "Which is the most likely effect of this increase in rotation?",
                       "choices": {"text": ARC, "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
                      {"query": "Question: Which is the most likely effect of this increase in rotation?",
                       "choices": ARC, "gold": 2}),
    "openbookqa": ({"question_stem": "they decide the best way to save money is to",
                    "choices": {"text": OBQA, "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
                   {"query": "they decide the best way to save money is to", "choices": OBQA, "gold": 1}),
    "boolq": ({"question": "is pain experienced in a missing body part or paralyzed area", "answer": True,
               "passage": PASSAGE},
              {"query": f"Passage: {PASSAGE}\nQuestion: is pain experienced in a missing body part or paralyzed area?",
               "choices": ["no", "yes"], "gold": 1}),
    "copa": ({"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
              "choice2": "Water flowed from the spout.", "question": "effect", "label": 1},
             {"query": "The man turned on the faucet, therefore",
              "choices": ["the toilet filled with water.", "water flowed from the spout."], "gold": 1}),
    # From the Hub SIQA keeps its three answers (llm-foundry's two-option file has no Hub dataset).
    "siqa": ({"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
              "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
              "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"},
             {"query": "Context: Tracy didn't go home that evening and resisted Riley's attacks.\nQuestion: What "
                       "does Tracy need to do before this?\nChoices:\nA. make a new plan\nB. Go home and see Riley\n"
                       "C. Find somewhere to go\nAnswer:", "choices": ["A", "B", "C"], "gold": 2}),
}


@pytest.fixture
def hub(monkeypatch) -> list[tuple]:
    """A stand-in for ``datasets`` that serves the rows above and records what was asked for."""
    calls: list[tuple] = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        task = next(t for t in TASKS.values() if t.hub and (t.hub.path, t.hub.name, t.hub.split) == (path, name, split))
        if task.name not in ROWS:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
        return [ROWS[task.name][0]]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("MOR_DATA_DIR", raising=False)
    return calls


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_hub_row_becomes_the_item_of_the_local_file(name, hub):
    task = TASKS[name]
    [doc] = load_docs(task)
    assert doc == {"id": f"{task.filename.split('.')[0]}/0", **ROWS[name][1]}
    assert hub == [(task.hub.path, task.hub.name, task.hub.split)]


def test_hellaswag_wikihow_markup_is_removed_as_lm_eval_does_without_capitalising():
    row = {"activity_label": "Personal Care and Style", "label": "0", "endings": ["x [title] Y.", "z"],
           "ctx": "[header] How to buy a wedding band for men [title] Find a ring suitable for his lifestyle. [step] "
                  "your fiancé is going to wear this ring every day."}
    doc = TASKS["hellaswag"].from_hub(row)
    assert doc["query"] == ("Personal Care and Style: How to buy a wedding band for men. Find a ring suitable for his "
                            "lifestyle. your fiancé is going to wear this ring every day.")
    assert doc["choices"] == ["x. Y.", "z"]


def test_every_task_names_a_hub_dataset():
    assert all(task.hub and task.from_hub for task in TASKS.values())
    assert data_source(TASKS["piqa"]) == "hf:baber/piqa, split validation"


def test_a_local_folder_replaces_the_hub(tmp_path, hub, monkeypatch):
    (tmp_path / "eval").mkdir()
    item = {"id": "copa/0", **ROWS["copa"][1]}
    (tmp_path / "eval" / "copa.jsonl").write_text(json.dumps(item) + "\n")
    assert load_docs(TASKS["copa"], tmp_path) == [item]
    monkeypatch.setenv("MOR_DATA_DIR", str(tmp_path))  # the same option, from the environment
    assert load_docs(TASKS["copa"]) == [item]
    assert data_source(TASKS["copa"]) == str(tmp_path / "eval" / "copa.jsonl")
    with pytest.raises(FileNotFoundError, match=r"piqa.jsonl does not exist; point --data-dir .* or leave both "
                                                r"unset to read baber/piqa, split validation from the Hugging Face"):
        load_docs(TASKS["piqa"])
    assert hub == []


def test_offline_without_a_cache_says_what_to_do(hub):
    # The stand-in has no ARC-Easy row: it answers as datasets does offline with nothing cached.
    with pytest.raises(FileNotFoundError, match=r"arc_easy: cannot load allenai/ai2_arc \(ARC-Easy\), split test from "
                                                r"the Hugging Face Hub \(ConnectionError: .*HF_DATASETS_OFFLINE=1.*"
                                                r"give --data-dir DIR with DIR/eval/arc_easy.jsonl"):
        load_docs(TASKS["arc_easy"])
