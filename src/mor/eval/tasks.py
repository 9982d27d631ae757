"""Zero- and few-shot tasks scored with the paper's metrics (MOR_SPEC 10.2); :mod:`mor.eval.task_data` defines
the tasks and reads their items.

Three request shapes cover every task:

* ``choice``: multiple choice. Each option is scored as ``query + delimiter`` -> ``choice``; ``acc`` takes the
  largest log-likelihood, ``acc_norm`` the largest log-likelihood per character of the choice (lm-evaluation-
  harness's ``acc_norm``: it divides by ``len(choice)``; for ASCII text that is the byte length).
* ``partial`` (WinoGrande): each filled-in context scores the same continuation, ``log P(" " + continuation |
  context_option)``; ``acc`` only.
* ``lambada``: ``acc`` is 1 when greedy decoding reproduces every continuation token; ``ppl`` is
  ``exp(-mean log P(" " + continuation | context))`` over items, as lm-evaluation-harness aggregates it.

Few-shot demonstrations are solved items of the same split (no train splits are read), never the scored item,
drawn per item from a generator seeded by ``(seed, item index)``, and joined with blank lines.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from mor.eval.results import Metric, mean_stderr
from mor.eval.scoring import encode_pair, eos_token_id, loglikelihoods, pad_token_id
from mor.eval.task_data import TASKS, Task, load_docs, resolve_tasks

__all__ = ["TASKS", "Task", "build_requests", "evaluate_task", "fewshot_indices", "item_scores", "load_docs",
           "resolve_tasks"]

FEWSHOT_SEPARATOR = "\n\n"


def fewshot_indices(n_docs: int, index: int, k: int, seed: int) -> list[int]:
    """``k`` distinct item indices other than ``index``, fixed by ``(seed, index)``."""
    if k > n_docs - 1:
        raise ValueError(f"{k}-shot needs at least {k + 1} items, the file has {n_docs}")
    picks = random.Random(f"{seed}:{index}").sample(range(n_docs - 1), k)
    return [p + (p >= index) for p in picks]  # skip over the scored item


def _solved(task: Task, doc: dict[str, Any]) -> str:
    """An item written out with its correct answer, as a demonstration."""
    if task.kind == "choice":
        return doc["query"] + task.delimiter + doc["choices"][doc["gold"]]
    if task.kind == "partial":
        return doc["context_options"][doc["gold"]] + task.delimiter + doc["continuation"]
    return doc["context"] + task.delimiter + doc["continuation"]


def build_requests(task: Task, docs: Sequence[dict[str, Any]], index: int, num_fewshot: int = 0,
                   seed: int = 1234) -> list[tuple[str, str]]:
    """The ``(context, continuation)`` strings to score for item ``index``, one per option."""
    doc = docs[index]
    prefix = "".join(_solved(task, docs[j]) + FEWSHOT_SEPARATOR
                     for j in fewshot_indices(len(docs), index, num_fewshot, seed)) if num_fewshot else ""
    if task.kind == "choice":
        return [(prefix + doc["query"] + task.delimiter, choice) for choice in doc["choices"]]
    if task.kind == "partial":
        return [(prefix + option + task.delimiter, doc["continuation"]) for option in doc["context_options"]]
    return [(prefix + doc["context"] + task.delimiter, doc["continuation"])]


def item_scores(task: Task, doc: dict[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """Per-item metric values from the item's ``(loglikelihood, is_greedy)`` results."""
    lls = np.array([ll for ll, _ in results])
    if task.kind == "choice":
        lengths = np.array([float(len(choice)) for choice in doc["choices"]])
        return {"acc": float(np.argmax(lls) == doc["gold"]),
                "acc_norm": float(np.argmax(lls / lengths) == doc["gold"])}
    if task.kind == "partial":
        return {"acc": float(np.argmax(lls) == doc["gold"])}
    return {"acc": float(results[0][1]), "loglikelihood": float(lls[0])}


def aggregate(task: Task, scores: Sequence[dict[str, float]], routing: str | None, num_fewshot: int) -> list[Metric]:
    n = len(scores)
    metrics = []
    for name in ("acc", "acc_norm"):
        if name in scores[0]:
            value, stderr = mean_stderr([s[name] for s in scores])
            metrics.append(Metric(task.name, name, value, stderr, n, routing, num_fewshot))
    if task.kind == "lambada":
        mean_ll, _ = mean_stderr([s["loglikelihood"] for s in scores])
        metrics.append(Metric(task.name, "ppl", float(np.exp(-mean_ll)), None, n, routing, num_fewshot))
    return metrics


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task: Task,
    *,
    routing: str | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    batch_size: int = 8,
    max_length: int | None = None,
    data_dir: str | Path | None = None,
    docs: Sequence[dict[str, Any]] | None = None,
    progress: bool = True,
) -> list[Metric]:
    """Score the first ``limit`` items of ``task`` (demonstrations come from the whole file)."""
    docs = load_docs(task, data_dir) if docs is None else docs
    scored = range(len(docs) if limit is None else min(limit, len(docs)))
    eot = eos_token_id(model)
    requests, owners = [], []
    for i in scored:
        for context, continuation in build_requests(task, docs, i, num_fewshot, seed):
            requests.append(encode_pair(tokenizer, context, continuation, eot))
            owners.append(i)
    results = loglikelihoods(model, requests, max_length=max_length or model.config.max_position_embeddings,
                             batch_size=batch_size, routing=routing, pad_id=pad_token_id(model),
                             desc=f"{task.name} [{routing or 'eval'}]", progress=progress)
    by_item: dict[int, list[tuple[float, bool]]] = {i: [] for i in scored}
    for owner, result in zip(owners, results):
        by_item[owner].append(result)
    scores = [item_scores(task, docs[i], by_item[i]) for i in scored]
    return aggregate(task, scores, routing, num_fewshot)
