"""The routing analyses of a checkpoint, each written to an output folder: depth-coloured text, and routing
statistics over a corpus sample (tokens per depth, router metrics, depth scaling)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mor.data.tokenizer import TextTokenizer
from mor.model import MoRForCausalLM
from mor.viz import depth_tokens
from mor.viz.depth_text import DepthSection, depth_html, depth_png, token_label, token_pieces
from mor.viz.metrics import routing_metrics
from mor.viz.routing_plots import plot_depth_scaling, plot_load, plot_router_scores, plot_tokens_per_depth
from mor.viz.trace import depth_scaling, trace


def describe(model: MoRForCausalLM) -> str:
    c = model.config
    router = f"{c.router}-choice router" if c.router != "none" else "no router"
    return (f"{c.num_hidden_layers} base layers, d={c.hidden_size}, sharing {c.sharing}, "
            f"Nr={c.num_recursions}, {router}")


def _mode_name(routing: str | None) -> str:
    return routing or "default"


def depth_text_report(model: MoRForCausalLM, tokenizer: TextTokenizer, text: str, out_dir: str | Path,
                      modes: list[str | None]) -> dict[str, list[int]]:
    """Write ``depth.html`` and ``depth.png``: the tokens of ``text`` coloured by recursion depth, one section per
    routing mode. Returns the depths per mode."""
    ids, pieces = token_pieces(tokenizer, text)
    if not ids:
        raise ValueError("the text holds no tokens; give some text")
    if len(ids) > model.config.max_position_embeddings:
        raise ValueError(f"the text is {len(ids)} tokens long but the model takes at most "
                         f"{model.config.max_position_embeddings}; give a shorter text")
    rows = torch.tensor([ids])
    sections, depths = [], {}
    for routing in modes:
        result = trace(model, rows, routing)
        depths[_mode_name(routing)] = result.depths[0].tolist()
        heading = f"routing: {routing}" if routing else "recursion depth"
        title = f"{heading} (mean depth {result.depths.double().mean():.2f})"
        sections.append(DepthSection(title, pieces, depths[_mode_name(routing)]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = model.config.num_recursions
    title = "Recursion depth per token"
    (out_dir / "depth.html").write_text(depth_html(sections, n, title, describe(model)))
    depth_png(sections, n, out_dir / "depth.png", f"{title} — {describe(model)}")
    (out_dir / "depth.json").write_text(json.dumps({"pieces": pieces, "ids": ids, "depths": depths}, indent=1) + "\n")
    return depths


def routing_stats_report(model: MoRForCausalLM, tokenizer: TextTokenizer, rows: Tensor, out_dir: str | Path,
                         modes: list[str | None], *, top: int = 15, batch_size: int = 8, scaling: bool = True,
                         progress: bool = True) -> dict[str, Any]:
    """Routing statistics of ``rows`` [N, T] in each mode, written to ``out_dir``:

    * ``routing_metrics.json``: NLL, depth distribution and router metrics per mode;
    * ``depth_by_token_MODE.{md,json,png}``: the most frequent tokens per depth and the mean depth of frequent
      tokens;
    * ``router_scores.png`` (expert-choice, top-k mode): router scores of selected and unselected tokens per step;
    * ``load.png`` (token-choice): load per depth;
    * ``depth_scaling.{json,png}``: NLL against the maximum recursion steps allowed (recurring models only).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    n = config.num_recursions
    label = functools.lru_cache(maxsize=None)(functools.partial(token_label, tokenizer))
    results: dict[str, Any] = {"model": describe(model), "modes": {}}
    for routing in modes:
        name = _mode_name(routing)
        result = trace(model, rows, routing, batch_size=batch_size, progress=progress)
        metrics = routing_metrics(result, n)
        results["modes"][name] = metrics
        counts = depth_tokens.depth_counts_by_token(result.input_ids, result.depths, config.vocab_size, n)
        per_depth = depth_tokens.per_depth_records(counts, label, top)
        frequent = depth_tokens.token_records(counts, label, max(top, 20))
        heading = f"Tokens per depth, routing {routing}" if routing else "Tokens per depth"
        (out_dir / f"depth_by_token_{name}.md").write_text(depth_tokens.markdown(per_depth, frequent, heading))
        (out_dir / f"depth_by_token_{name}.json").write_text(
            json.dumps({"per_depth": per_depth, "tokens": depth_tokens.token_records(counts, label, 200)},
                       indent=1, ensure_ascii=False) + "\n")
        plot_tokens_per_depth(per_depth, n, out_dir / f"depth_by_token_{name}.png",
                              f"{heading} ({len(rows)} rows × {rows.shape[1]} tokens)")
        if result.scores and routing == "topk":
            steps = range(1, len(result.scores) + 1)
            accuracy = ", ".join(f"{metrics[f'sampling_accuracy/step{s}']:.1%}" for s in steps)
            plot_router_scores(result, out_dir / "router_scores.png",
                               f"Router scores per step against the top-k selection\nsampling accuracy {accuracy}; "
                               f"dead tokens {metrics['dead_token_ratio']:.1%}")
        if "load" in metrics:
            plot_load(metrics["load"], metrics["max_violation"], metrics["entropy"], out_dir / "load.png",
                      "Token-choice load")
    (out_dir / "routing_metrics.json").write_text(json.dumps(results, indent=2) + "\n")

    if scaling and config.is_cycle:
        curves = {f"routing {_mode_name(r)}" if r else "NLL":
                  depth_scaling(model, rows, r, batch_size=batch_size, progress=progress) for r in modes}
        results["depth_scaling"] = curves
        (out_dir / "depth_scaling.json").write_text(json.dumps(
            {"max_recursions": list(range(1, n + 1)), "nll": curves}, indent=2) + "\n")
        plot_depth_scaling(curves, out_dir / "depth_scaling.png", "Test-time depth scaling")
    return results
