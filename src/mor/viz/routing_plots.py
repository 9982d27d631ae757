"""Plots of routing behaviour: tokens per depth, router scores per step, token-choice load, depth scaling."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mor.viz.style import depth_colors, new_figure, save
from mor.viz.trace import RoutingTrace


def plot_tokens_per_depth(per_depth: dict[int, list[dict[str, Any]]], num_recursions: int, path: str | Path,
                          title: str) -> Path:
    """One panel per depth: horizontal bars of the most frequent tokens there, annotated with the share of
    each token's occurrences that ran that depth."""
    depths = sorted(per_depth) or [1]
    rows = max((len(v) for v in per_depth.values()), default=1)
    colors = depth_colors(num_recursions)
    fig = new_figure(3.4 * len(depths) + 0.6, 0.8 + 0.24 * rows)
    axes = fig.subplots(1, len(depths), squeeze=False)[0]
    for ax, depth in zip(axes, depths):
        records = per_depth.get(depth, [])
        y = np.arange(len(records))
        counts = [r["count"] for r in records]
        ax.barh(y, counts, color=colors[depth])
        ax.set_yticks(y, [r["token"] for r in records], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"depth {depth}", fontsize=10)
        ax.set_xlabel("occurrences", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        for yi, record in zip(y, records):
            ax.text(record["count"], yi, f" {record['share']:.0%}", va="center", fontsize=7)
        if counts:
            ax.set_xlim(0, max(counts) * 1.25)  # room for the share labels
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.supxlabel("labels: share of the token's occurrences that ran this depth", fontsize=8)
    return save(fig, path)


def plot_router_scores(trace: RoutingTrace, path: str | Path, title: str) -> Path:
    """Expert-choice (paper Fig. 5b): per step, the distribution of the decision score of the tokens that entered
    it, split by the actual selection, with the causal threshold."""
    steps = len(trace.scores)
    fig = new_figure(3.2 * steps + 0.4, 2.8)
    axes = fig.subplots(1, steps, squeeze=False, sharey=True)[0]
    bins = np.linspace(0.0, 1.0, 41)
    for step, (ax, scores) in enumerate(zip(axes, trace.scores), start=1):
        entered = ~scores.isnan()
        selected = (trace.depths >= step)[entered].numpy()
        values = scores[entered].numpy()
        ax.hist(values[selected], bins=bins, color="#2a788e", alpha=0.75, label="selected")
        ax.hist(values[~selected], bins=bins, color="#f98e09", alpha=0.75, label="not selected")
        ax.axvline(trace.threshold, color="black", linestyle="--", linewidth=1,
                   label=f"causal threshold {trace.threshold:g}")
        ax.set_yscale("log")
        ax.set_title(f"step {step}", fontsize=10)
        ax.set_xlabel("router score", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("tokens", fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def plot_load(load: list[float], max_violation: float, entropy: float, path: str | Path, title: str) -> Path:
    """Token-choice: fraction of tokens assigned each depth against the balanced share 1/Nr."""
    n = len(load)
    fig = new_figure(max(4.4, 1.2 + 0.8 * n), 3.0)
    ax = fig.subplots()
    ax.bar(range(1, n + 1), load, color=depth_colors(n)[1:])
    ax.axhline(1.0 / n, color="black", linestyle="--", linewidth=1, label="balanced")
    ax.set_xticks(range(1, n + 1))
    ax.set_xlabel("assigned depth")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"MaxVio {max_violation:.3f}, entropy {entropy:.3f} (max ln {n} = {math.log(n):.3f})", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def plot_depth_scaling(curves: dict[str, list[float]], path: str | Path, title: str) -> Path:
    """NLL against the largest number of recursion steps allowed at inference, one line per curve."""
    fig = new_figure(4.8, 3.4)
    ax = fig.subplots()
    for name, nlls in curves.items():
        ax.plot(range(1, len(nlls) + 1), nlls, marker="o", label=name)
    longest = max((len(v) for v in curves.values()), default=1)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlabel("max recursion steps at inference")
    ax.set_ylabel("NLL (nats / token)")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    return save(fig, path)
