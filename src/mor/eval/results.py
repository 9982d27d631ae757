"""Metric records, standard errors and the results table (Markdown and JSON)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    """One number of an evaluation; ``routing`` is None for models without a router."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    routing: str | None = None
    num_fewshot: int = 0


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error, ``sample std (n-1) / sqrt(n)``, as lm-evaluation-harness reports it."""
    n = len(values)
    if n == 0:
        raise ValueError("cannot average an empty list of scores")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def markdown_table(metrics: Sequence[Metric]) -> str:
    lines = ["| task | routing | shots | metric | value | stderr | n |", "|---|---|---:|---|---:|---:|---:|"]
    for m in metrics:
        stderr = "" if m.stderr is None else f"{m.stderr:.4f}"
        lines.append(f"| {m.task} | {m.routing or '-'} | {m.num_fewshot} | {m.metric} | {m.value:.4f} | {stderr} "
                     f"| {m.n} |")
    return "\n".join(lines)


def write_json(path: str | Path, metrics: Sequence[Metric], **context: Any) -> None:
    """Write ``{**context, "results": [metric, ...]}``; context records what was evaluated and how."""
    payload = {**context, "results": [asdict(m) for m in metrics]}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
