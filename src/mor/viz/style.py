"""Shared look of the figures: one colour per recursion depth, and figure creation without pyplot.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, so plotting never
needs a display and never touches pyplot's global state.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

DEPTH_CMAP = "viridis_r"  # light (shallow) to dark (deep); readable for colour-blind viewers


def depth_colors(num_recursions: int) -> list[str]:
    """Hex colour of depths 0..Nr: depth 0 (never ran the block) grey, then light to dark."""
    cmap = colormaps[DEPTH_CMAP]
    steps = [0.1 + 0.8 * (d - 1) / max(num_recursions - 1, 1) for d in range(1, num_recursions + 1)]
    return ["#d9d9d9"] + [to_hex(cmap(s)) for s in steps]


def text_color(background: str) -> str:
    """Black or white, whichever contrasts more with ``background`` (WCAG relative luminance)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(background)]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    # Contrast ratios: with black (L + 0.05) / 0.05, with white 1.05 / (L + 0.05).
    return "#000000" if (luminance + 0.05) ** 2 > 0.05 * 1.05 else "#ffffff"


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
