"""Shared look of the figures: one colour per recursion depth, and figure creation without pyplot.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, so plotting never
needs a display and never touches pyplot's global state.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

DEPTH_CMAP = "viridis_r"  # light (shallow) to dark (deep); readable for colour-blind viewers


def depth_colors(num_recursions: int) -> list[str]:
    """Hex colour of depths 0..Nr: depth 0 (never ran the block) grey, then light to dark."""
    cmap = colormaps[DEPTH_CMAP]
    steps = [0.1 + 0.8 * (d - 1) / max(num_recursions - 1, 1) for d in range(1, num_recursions + 1)]
    return ["#d9d9d9"] + [to_hex(cmap(s)) for s in steps]


def text_color(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (relative luminance)."""
    r, g, b = (int(background[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "#ffffff"


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
