"""Shared look of the figures: one colour per recursion depth (the terminal's, from mor.infer.streaming), and
figure creation without pyplot.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, so plotting never
needs a display and never touches pyplot's global state.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from mor.infer.streaming import depth_palette as depth_colors
from mor.infer.streaming import text_colour as text_color

__all__ = ["depth_colors", "new_figure", "save", "text_color"]


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
