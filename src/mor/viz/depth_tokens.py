"""Which tokens go how deep: per-token depth counts over a corpus sample, as records, Markdown and JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def depth_counts_by_token(input_ids: Tensor, depths: Tensor, vocab_size: int, num_depths: int) -> Tensor:
    """``counts[v, d]``: occurrences of token ``v`` that ran exactly ``d`` recursion steps (d = 0..num_depths)."""
    counts = torch.zeros(vocab_size, num_depths + 1, dtype=torch.long)
    ones = torch.ones(input_ids.numel(), dtype=torch.long)
    counts.index_put_((input_ids.flatten().long(), depths.flatten().long()), ones, accumulate=True)
    return counts


def top_tokens_per_depth(counts: Tensor, k: int) -> dict[int, list[tuple[int, int]]]:
    """For each depth d >= 1 that some token ran: the ``k`` most frequent ``(token id, count)`` at depth d."""
    result = {}
    for depth in range(1, counts.shape[1]):
        column = counts[:, depth]
        present = int((column > 0).sum())
        if present:
            top = column.topk(min(k, present))
            result[depth] = list(zip(top.indices.tolist(), top.values.tolist()))
    return result


def token_records(counts: Tensor, label: Callable[[int], str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most frequent tokens: count, mean depth and count at each depth."""
    totals = counts.sum(1)
    present = int((totals > 0).sum())
    top = totals.topk(min(k, present)).indices.tolist() if present else []
    depth_values = torch.arange(counts.shape[1], dtype=torch.float64)
    return [{"id": t, "token": label(t), "count": int(totals[t]),
             "mean_depth": float((counts[t].double() * depth_values).sum() / totals[t]),
             "depth_counts": counts[t].tolist()} for t in top]


def per_depth_records(counts: Tensor, label: Callable[[int], str], k: int) -> dict[int, list[dict[str, Any]]]:
    """Per depth, the ``k`` most frequent tokens there, with the share of each token's occurrences at that depth."""
    totals = counts.sum(1)
    return {depth: [{"id": t, "token": label(t), "count": c, "share": c / int(totals[t])} for t, c in top]
            for depth, top in top_tokens_per_depth(counts, k).items()}


def markdown(per_depth: dict[int, list[dict[str, Any]]], tokens: list[dict[str, Any]], title: str) -> str:
    """Two tables: the most frequent tokens at each depth, and the mean depth of the most frequent tokens."""
    depths = sorted(per_depth)
    lines = [f"## {title}", "", "Most frequent tokens at each depth: count (share of that token's occurrences).", "",
             "| # | " + " | ".join(f"depth {d}" for d in depths) + " |", "|---:|" + "---|" * len(depths)]
    for rank in range(max((len(v) for v in per_depth.values()), default=0)):
        cells = [_cell(per_depth[d][rank]) if rank < len(per_depth[d]) else "" for d in depths]
        lines.append(f"| {rank + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Mean depth of the most frequent tokens.", "",
              "| token | count | mean depth | " + " | ".join(f"@{d}" for d in depths) + " |",
              "|---|---:|---:|" + "---:|" * len(depths)]
    for record in tokens:
        per = " | ".join(str(record["depth_counts"][d]) for d in depths)
        lines.append(f"| {_code(record['token'])} | {record['count']} | {record['mean_depth']:.2f} | {per} |")
    return "\n".join(lines) + "\n"


def _cell(record: dict[str, Any]) -> str:
    return f"{_code(record['token'])} {record['count']} ({record['share']:.0%})"


def _code(token: str) -> str:
    """A token as inline code in a table cell (backticks and pipes made harmless)."""
    return "`" + token.replace("`", "ˋ").replace("|", "¦") + "`"
