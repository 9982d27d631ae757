"""The zero/few-shot tasks and where their items come from.

Each task is a public Hugging Face dataset (the split the paper's numbers use), read with ``datasets``: online it
downloads once into the Hugging Face cache, and later runs (also with ``HF_DATASETS_OFFLINE=1``, offline) read
the cache. A local folder can stand in for the Hub: ``<data_dir>/eval/<task file>`` in the schema below, one JSON
object a line (``.gz`` allowed). The one option that chooses is ``data_dir`` (``mor eval --data-dir``, or
``$MOR_DATA_DIR``); without it the Hub is used.

Every row becomes one item in a schema shared by all sources:

* ``choice``: ``{"query", "choices", "gold"}``, scored as ``query + delimiter + choice``;
* ``partial`` (WinoGrande): ``{"context_options", "continuation", "gold"}``;
* ``lambada``: ``{"context", "continuation"}``.

The conversions write the prompts of llm-foundry's local evaluation files (question prefixes, COPA's
connectives, HellaSwag cleaned as lm-evaluation-harness cleans it but without capitalising ``ctx_b``), so a
task scores the same items the same way from either source. SIQA is the one exception: llm-foundry's file is a
two-option reformulation that has no Hub dataset; from the Hub it is the three-option original (chance 1/3).

Importing this module loads neither torch nor ``datasets``: ``mor eval --help`` lists the tasks from it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Doc = dict[str, Any]


@dataclass(frozen=True)
class HubDataset:
    path: str  # Hugging Face dataset name
    name: str | None  # its configuration
    split: str

    def __str__(self) -> str:
        return f"{self.path}" + (f" ({self.name})" if self.name else "") + f", split {self.split}"


def _lambada(row: Doc) -> Doc:
    context, _, word = row["text"].rpartition(" ")
    return {"context": context, "continuation": word}


def _clean_wikihow(text: str) -> str:
    """HellaSwag's WikiHow markup removed as lm-evaluation-harness does (its ``preprocess``)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: Doc) -> Doc:
    return {"query": _clean_wikihow(row["activity_label"] + ": " + row["ctx"]),
            "choices": [_clean_wikihow(ending) for ending in row["endings"]], "gold": int(row["label"])}


def _piqa(row: Doc) -> Doc:
    return {"query": f"Question: {row['goal']}\n", "choices": [row["sol1"], row["sol2"]], "gold": int(row["label"])}


def _winogrande(row: Doc) -> Doc:
    sentence = row["sentence"]
    blank = sentence.index("_")
    return {"context_options": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
            "continuation": sentence[blank + 1:].strip(), "gold": int(row["answer"]) - 1}


def _arc(row: Doc) -> Doc:
    return {"query": f"Question: {row['question']}", "choices": list(row["choices"]["text"]),
            "gold": list(row["choices"]["label"]).index(row["answerKey"])}


def _openbookqa(row: Doc) -> Doc:
    return {"query": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": list(row["choices"]["label"]).index(row["answerKey"].strip())}


def _boolq(row: Doc) -> Doc:
    return {"query": f"Passage: {row['passage']}\nQuestion: {row['question']}?", "choices": ["no", "yes"],
            "gold": int(row["answer"])}


def _copa(row: Doc) -> Doc:
    connective = {"cause": "because", "effect": "therefore"}[row["question"]]
    return {"query": f"{row['premise'].strip()[:-1]}, {connective}",  # the premise's full stop gives way
            "choices": [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])], "gold": int(row["label"])}


def _siqa(row: Doc) -> Doc:
    answers = [row["answerA"], row["answerB"], row["answerC"]]
    options = "".join(f"{letter}. {answer}\n" for letter, answer in zip("ABC", answers))
    return {"query": f"Context: {row['context']}\nQuestion: {row['question']}\nChoices:\n{options}Answer:",
            "choices": ["A", "B", "C"], "gold": int(row["label"]) - 1}


@dataclass(frozen=True)
class Task:
    name: str
    filename: str  # the local file, in <data_dir>/eval/
    kind: str  # "choice", "partial" or "lambada"
    delimiter: str = " "  # between query and answer (llm-foundry's continuation delimiter)
    primary: str = "acc_norm"  # the metric the paper reports
    hub: HubDataset | None = None
    from_hub: Callable[[Doc], Doc] | None = None  # a row of the Hub dataset as an item


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("lambada", "lambada_openai.jsonl", "lambada", primary="acc",
         hub=HubDataset("EleutherAI/lambada_openai", "default", "test"), from_hub=_lambada),
    Task("hellaswag", "hellaswag.jsonl.gz", "choice",
         hub=HubDataset("Rowan/hellaswag", None, "validation"), from_hub=_hellaswag),
    # PIQA queries end in a newline already: "Question: ...\nAnswer: <solution>", lm-eval's prompt (the paper's).
    Task("piqa", "piqa.jsonl", "choice", delimiter="Answer: ",
         hub=HubDataset("baber/piqa", None, "validation"), from_hub=_piqa),
    Task("winogrande", "winogrande.jsonl", "partial", primary="acc",
         hub=HubDataset("allenai/winogrande", "winogrande_xl", "validation"), from_hub=_winogrande),
    Task("arc_easy", "arc_easy.jsonl", "choice", delimiter="\nAnswer: ",
         hub=HubDataset("allenai/ai2_arc", "ARC-Easy", "test"), from_hub=_arc),
    Task("arc_challenge", "arc_challenge.jsonl", "choice", delimiter="\nAnswer: ",
         hub=HubDataset("allenai/ai2_arc", "ARC-Challenge", "test"), from_hub=_arc),
    Task("openbookqa", "openbookqa.jsonl", "choice",
         hub=HubDataset("allenai/openbookqa", "main", "test"), from_hub=_openbookqa),
    Task("boolq", "boolq.jsonl", "choice", delimiter="\nAnswer: ", primary="acc",
         hub=HubDataset("google/boolq", None, "validation"), from_hub=_boolq),
    Task("copa", "copa.jsonl", "choice", primary="acc",
         hub=HubDataset("aps/super_glue", "copa", "validation"), from_hub=_copa),
    Task("siqa", "siqa.jsonl", "choice", primary="acc",
         hub=HubDataset("lighteval/siqa", None, "validation"), from_hub=_siqa),
)}
ALIASES = {"lambada_openai": "lambada", "openbook_qa": "openbookqa", "obqa": "openbookqa"}
# The paper's downstream columns that exist locally (MMLU is not shipped).
PAPER_TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge")


def resolve_tasks(spec: str | Sequence[str]) -> list[Task]:
    """Tasks named in a comma-separated list (or a sequence); ``all`` and ``paper`` name groups."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    tasks: list[Task] = []
    for name in names:
        key = ALIASES.get(name.lower(), name.lower())
        group = {"all": list(TASKS), "paper": list(PAPER_TASKS)}.get(key, [key])
        for member in group:
            if member not in TASKS:
                raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)} (or the groups "
                                 f"'all', 'paper')")
            if TASKS[member] not in tasks:
                tasks.append(TASKS[member])
    if not tasks:
        raise ValueError("no task given; pass e.g. --tasks lambada,hellaswag or --tasks paper")
    return tasks


def default_data_dir() -> Path | None:
    """``$MOR_DATA_DIR`` when set: the local folder that replaces the Hub."""
    return Path(os.environ["MOR_DATA_DIR"]) if os.environ.get("MOR_DATA_DIR") else None


def data_source(task: Task, data_dir: str | Path | None = None) -> str:
    """Where ``load_docs`` reads ``task`` from: a local file, or the Hub dataset."""
    data_dir = data_dir or default_data_dir()
    return str(Path(data_dir) / "eval" / task.filename) if data_dir else f"hf:{task.hub}"


def load_docs(task: Task, data_dir: str | Path | None = None) -> list[Doc]:
    """The items of ``task``: from ``<data_dir>/eval`` when a data folder is given (or ``$MOR_DATA_DIR``), else
    from its Hugging Face dataset (or the ``datasets`` cache)."""
    data_dir = data_dir or default_data_dir()
    docs = _local_docs(task, Path(data_dir)) if data_dir else _hub_docs(task)
    if not docs:
        raise ValueError(f"{task.name}: {data_source(task, data_dir)} holds no items")
    return docs


def _local_docs(task: Task, data_dir: Path) -> list[Doc]:
    path = data_dir / "eval" / task.filename
    if not path.exists():
        raise FileNotFoundError(f"{task.name}: {path} does not exist; point --data-dir (or MOR_DATA_DIR) at a folder "
                                f"holding eval/{task.filename}, or leave both unset to read {task.hub} from the "
                                "Hugging Face Hub")
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hub_docs(task: Task) -> list[Doc]:
    if task.hub is None or task.from_hub is None:
        raise ValueError(f"{task.name}: no Hugging Face dataset known; give a local folder with --data-dir")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{task.name}: reading {task.hub} from the Hugging Face Hub needs the 'datasets' package: "
                          "pip install 'mor[data]'; or give a local folder with --data-dir") from None
    try:
        rows = datasets.load_dataset(task.hub.path, task.hub.name, split=task.hub.split)
    except (OSError, ValueError) as error:  # offline without a cache (ConnectionError), a renamed dataset
        raise FileNotFoundError(
            f"{task.name}: cannot load {task.hub} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Online, datasets downloads it once into its cache (HF_HOME) and later runs read the cache, also "
            f"offline with HF_DATASETS_OFFLINE=1; without either, give --data-dir DIR with DIR/eval/{task.filename}"
        ) from None
    stem = task.filename.split(".")[0]  # ids as in the local files: "lambada_openai/0"
    return [{"id": f"{stem}/{i}", **task.from_hub(row)} for i, row in enumerate(rows)]
