"""Evaluation: validation perplexity, zero/few-shot tasks with the paper's metrics, and an lm-evaluation-harness
model (:mod:`mor.eval.lm_eval_adapter`, imported on demand because lm-eval is an optional dependency)."""

from typing import TYPE_CHECKING

from mor._lazy import lazy_exports

if TYPE_CHECKING:
    from mor.eval.perplexity import PerplexityResult, evaluate_perplexity, pack_rows, text_rows
    from mor.eval.results import Metric, markdown_table, mean_stderr, write_json
    from mor.eval.scoring import encode_pair, loglikelihoods
    from mor.eval.tasks import TASKS, Task, evaluate_task, load_docs, resolve_tasks

__all__ = [
    "Metric", "PerplexityResult", "TASKS", "Task", "encode_pair", "evaluate_perplexity", "evaluate_task",
    "load_docs", "loglikelihoods", "markdown_table", "mean_stderr", "pack_rows", "resolve_tasks", "text_rows",
    "write_json",
]
lazy_exports(__name__, {
    "mor.eval.perplexity": ("PerplexityResult", "evaluate_perplexity", "pack_rows", "text_rows"),
    "mor.eval.results": ("Metric", "markdown_table", "mean_stderr", "write_json"),
    "mor.eval.scoring": ("encode_pair", "loglikelihoods"),
    "mor.eval.tasks": ("TASKS", "Task", "evaluate_task", "load_docs", "resolve_tasks"),
})
