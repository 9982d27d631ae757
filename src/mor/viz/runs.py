"""Training runs: read run directories and plot loss curves and NLL against training FLOPs.

A run directory (written by ``mor train``) holds ``metrics.jsonl``, one JSON object per logged step with at least
``step`` and usually ``tokens``, ``loss``, ``lm_loss``, ``lr`` and, at validation, ``val/nll`` (or, for
expert-choice models, ``val/nll_topk`` and ``val/nll_causal``); ``model_config.json`` and ``config.yaml`` give the
model and sequence length for the FLOP count. Any key may be missing: what is absent is simply not drawn. Keys are read
with ``/`` or ``_`` alike (``val/nll_causal`` = ``val_nll_causal``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.ticker import EngFormatter

from mor.config import MoRConfig
from mor.model.flops import forward_flops_per_token
from mor.viz.style import new_figure, save

METRICS_FILE = "metrics.jsonl"
TRAIN_KEYS = ("lm_loss", "loss")  # the language-model loss without auxiliary terms, when logged
VAL_KEYS = {"val_nll": "val", "val_nll_topk": "val top-k", "val_nll_causal": "val causal"}
VAL_STYLES = {"val_nll": "-", "val_nll_topk": "--", "val_nll_causal": ":"}


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict[str, Any]]
    model_config: MoRConfig | None = None
    seq_len: int | None = None

    def series(self, key: str, x_key: str) -> tuple[list[float], list[float]]:
        """(x, y) of the records that hold both keys, in logged order."""
        points = [(r[x_key], r[key]) for r in self.records if _number(r.get(key)) and _number(r.get(x_key))]
        return [p[0] for p in points], [p[1] for p in points]

    def train_key(self) -> str | None:
        return next((k for k in TRAIN_KEYS if any(_number(r.get(k)) for r in self.records)), None)

    def val_keys(self) -> list[str]:
        return [k for k in VAL_KEYS if any(_number(r.get(k)) for r in self.records)]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory; a malformed line of ``metrics.jsonl`` (e.g. cut off by a crash) is skipped."""
    path = Path(path)
    file = path / METRICS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no {METRICS_FILE}; give a run directory written by `mor train`")
    records, bad = [], 0
    for line in file.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append({key.replace("/", "_"): value for key, value in record.items()})
    if bad:
        print(f"{file}: skipped {bad} malformed line(s)", file=sys.stderr)
    model_config, seq_len = _run_configs(path)
    return Run(name or path.name, path, records, model_config, seq_len)


def _run_configs(path: Path) -> tuple[MoRConfig | None, int | None]:
    """The model config (``model_config.json``, ``config.json`` or the ``model`` section of ``config.yaml``) and
    the training sequence length (``data.seq_len`` of ``config.yaml``), each None when absent."""
    train: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        train = yaml.safe_load((path / "config.yaml").read_text()) or {}
    seq_len = (train.get("data") or {}).get("seq_len")
    for name in ("model_config.json", "config.json"):
        if (path / name).is_file():
            return MoRConfig.load(path / name), seq_len
    model = dict(train.get("model") or {})
    if not model:
        return None, seq_len
    preset = model.pop("preset", None)
    return (MoRConfig.from_preset(preset, **model) if preset else MoRConfig(**model)), seq_len


def flops_per_token(run: Run, seq_len: int | None = None) -> float:
    """Forward FLOPs per token of the run's model (MOR_SPEC 8) at ``seq_len`` (default: the run's)."""
    if run.model_config is None:
        raise ValueError(f"run {run.path}: no model_config.json, config.json or config.yaml with a model section; "
                         "pass --flops-per-token")
    seq_len = seq_len or run.seq_len
    if seq_len is None:
        raise ValueError(f"run {run.path}: the sequence length is unknown (no data.seq_len in config.yaml); "
                         "pass --seq-len")
    return forward_flops_per_token(run.model_config, seq_len)


def _x_key(runs: list[Run], keys: list[str]) -> str:
    """Tokens when every record that will be drawn holds them, else steps."""
    drawn = [r for run in runs for r in run.records if any(_number(r.get(k)) for k in keys)]
    return "tokens" if drawn and all(_number(r.get("tokens")) for r in drawn) else "step"


def plot_loss_curves(runs: list[Run], path: str | Path) -> Path | None:
    """Training loss (lines) and validation NLL (markers; top-k dashed, causal dotted) of each run against
    tokens, with the learning rate below when logged. None when no run logged a loss."""
    keys = list(TRAIN_KEYS) + list(VAL_KEYS)
    if not any(run.train_key() or run.val_keys() for run in runs):
        return None
    x_key = _x_key(runs, keys)
    has_lr = any(run.series("lr", x_key)[0] for run in runs)
    fig = new_figure(7.0, 6.0 if has_lr else 4.2)
    axes = fig.subplots(2 if has_lr else 1, 1, sharex=True, squeeze=False, height_ratios=[3, 1] if has_lr else [1])
    ax = axes[0, 0]
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if key := run.train_key():
            ax.plot(*run.series(key, x_key), color=color, linewidth=1.2, alpha=0.8, label=f"{run.name} train")
        for key in run.val_keys():
            ax.plot(*run.series(key, x_key), color=color, linestyle=VAL_STYLES[key], marker="o", markersize=4,
                    label=f"{run.name} {VAL_KEYS[key]}")
        if has_lr:
            axes[1, 0].plot(*run.series("lr", x_key), color=color, linewidth=1.2)
    ax.set_ylabel("loss / NLL (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, ncols=2 if len(runs) > 2 else 1)
    ax.set_title("Training loss and validation NLL", fontsize=11)
    if has_lr:
        axes[1, 0].set_ylabel("learning rate")
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x_key)
    if x_key == "tokens":
        axes[-1, 0].xaxis.set_major_formatter(EngFormatter())  # 200k, 1.5M, 2G
    return save(fig, path)


def plot_nll_vs_flops(runs: list[Run], flops: list[float], path: str | Path) -> Path | None:
    """NLL against training compute, ``tokens x forward FLOPs per token`` (``flops[i]`` for ``runs[i]``), on a
    log axis: validation NLL when logged, else the training loss. None when no run has tokens and a loss."""
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    drawn = False
    for i, (run, per_token) in enumerate(zip(runs, flops)):
        color = f"C{i % 10}"
        keys = run.val_keys() or [k for k in [run.train_key()] if k]
        for key in keys:
            tokens, nll = run.series(key, "tokens")
            if not tokens:
                continue
            label = f"{run.name} {VAL_KEYS.get(key, 'train')}"
            style = dict(linestyle=VAL_STYLES[key], marker="o", markersize=4) if key in VAL_KEYS else dict(alpha=0.8)
            ax.plot([t * per_token for t in tokens], nll, color=color, label=label, **style)
            drawn = True
    if not drawn:
        return None
    ax.set_xscale("log")
    ax.set_xlabel("training compute: tokens × forward FLOPs per token")
    ax.set_ylabel("NLL (nats / token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("NLL against forward FLOPs", fontsize=11)
    return save(fig, path)
