"""Benchmark results: throughput against NLL (paper Fig. 4a).

A benchmark JSON file is a list of records (or an object holding one under ``records``/``results``), each with a
model name (``model``, ``name`` or ``label``), a throughput (``tokens_per_s``, ``throughput``,
``normalized_throughput`` or ``speedup``) and optionally an NLL (``nll``, ``val_nll``, ``val/nll``). Records that
hold an ``error``, or no name or throughput, are skipped. Records are grouped into series by ``shape`` and
``batch_size`` when present.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mor.viz.style import new_figure, save

NAME_KEYS = ("model", "name", "label")
THROUGHPUT_KEYS = ("tokens_per_s", "throughput", "normalized_throughput", "speedup")
NLL_KEYS = ("nll", "val_nll", "val/nll")
GROUP_KEYS = ("shape", "batch_size")


@dataclass
class BenchPoint:
    name: str
    throughput: float
    nll: float | None
    group: str  # "" when the records carry no grouping keys
    unit: str  # the key the throughput came from


def _first(record: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    return next(((k, record[k]) for k in keys if record.get(k) is not None), None)


def load_bench(paths: list[str | Path], nll: dict[str, float] | None = None) -> list[BenchPoint]:
    """Benchmark points of every file; ``nll`` gives (or overrides) the NLL of named models, keyed ``NAME`` or,
    for one shape only, ``SHAPE/NAME``."""
    nll = nll or {}
    points = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict):
            data = data.get("records", data.get("results"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of benchmark records (or an object with 'records')")
        skipped = 0
        for record in data:
            if not isinstance(record, dict):
                skipped += 1
                continue
            name, speed = _first(record, NAME_KEYS), _first(record, THROUGHPUT_KEYS)
            if record.get("error") or name is None or speed is None:
                skipped += 1
                continue
            logged = (_first(record, NLL_KEYS) or (None, None))[1]
            value = nll.get(f"{record.get('shape')}/{name[1]}", nll.get(str(name[1]), logged))
            group = ", ".join(f"{k}={record[k]}" for k in GROUP_KEYS if k in record)
            points.append(BenchPoint(str(name[1]), float(speed[1]), value, group, speed[0]))
        if skipped:
            print(f"{path}: skipped {skipped} record(s) without a name or throughput, or with an error",
                  file=sys.stderr)
    return points


def normalise(points: list[BenchPoint], baseline: str) -> list[BenchPoint]:
    """Throughput relative to the ``baseline`` model of the same group (the paper normalises to vanilla)."""
    reference = {p.group: p.throughput for p in points if p.name == baseline}
    missing = sorted({p.group or "(all)" for p in points if p.group not in reference})
    if missing:
        raise ValueError(f"baseline {baseline!r} is missing from group(s) {missing}; names present: "
                         f"{sorted({p.name for p in points})}")
    return [BenchPoint(p.name, p.throughput / reference[p.group], p.nll, p.group, "relative to " + baseline)
            for p in points]


def plot_throughput_vs_nll(points: list[BenchPoint], path: str | Path) -> Path:
    """Throughput (y) against NLL (x), one marker series per group, each point labelled with its model. Without
    any NLL, a bar chart of throughput per model."""
    if not points:
        raise ValueError("no benchmark points to plot")
    unit = points[0].unit.replace("_", " ")
    groups = list(dict.fromkeys(p.group for p in points))
    with_nll = [p for p in points if p.nll is not None]
    if with_nll:
        fig = new_figure(6.0, 4.4)
        ax = fig.subplots()
        for i, group in enumerate(groups):
            members = [p for p in with_nll if p.group == group]
            ax.scatter([p.nll for p in members], [p.throughput for p in members], color=f"C{i % 10}", s=36,
                       label=group or None, zorder=3)
            for p in members:  # groups label on alternating sides, so equal points of two groups stay legible
                ax.annotate(p.name, (p.nll, p.throughput), textcoords="offset points", fontsize=8,
                            xytext=(5, 4) if i % 2 == 0 else (5, -11))
        ax.set_xlabel("NLL (nats / token)")
        ax.set_title("Throughput against NLL", fontsize=11)
        ax.margins(x=0.2, y=0.15)  # room for the labels
        if len(points) > len(with_nll):
            print(f"{len(points) - len(with_nll)} benchmark point(s) have no NLL and are not drawn; give --nll "
                  "NAME=VALUE", file=sys.stderr)
    else:
        names = list(dict.fromkeys(p.name for p in points))
        width = 0.8 / len(groups)
        fig = new_figure(1.5 + 0.6 * len(names) * max(1, len(groups) / 2), 4.2)
        ax = fig.subplots()
        for i, group in enumerate(groups):
            speed = {p.name: p.throughput for p in points if p.group == group}
            xs = [j + (i - (len(groups) - 1) / 2) * width for j, n in enumerate(names) if n in speed]
            ax.bar(xs, [speed[n] for n in names if n in speed], width, color=f"C{i % 10}", label=group or None)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title("Throughput", fontsize=11)
    if points[0].unit.startswith("relative to"):
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylabel(f"throughput ({unit})")
    ax.grid(alpha=0.3)
    if any(groups):
        ax.legend(fontsize=8, frameon=False)
    return save(fig, path)
