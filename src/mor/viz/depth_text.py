"""Text coloured by recursion depth: every token in a box whose colour says how many steps it ran (paper Fig. 1).

Tokens are cut from the text by the tokenizer's character offsets, so the boxes put together spell the input
exactly (a character split over several byte-level tokens goes to the first of them). Written as HTML (one
``<span class="depth-d">`` per token, with a legend) and as PNG (matplotlib, wrapped lines).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.textpath import text_to_path

from mor.data.tokenizer import TextTokenizer
from mor.viz.style import depth_colors, new_figure, save, text_color


@dataclass
class DepthSection:
    """One panel: a title and the token pieces of a text with the depth each ran."""

    title: str
    pieces: list[str]
    depths: list[int]


def token_pieces(tokenizer: TextTokenizer, text: str) -> tuple[list[int], list[str]]:
    """Token ids of ``text`` and the piece of text each one covers."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    pieces, cursor = [], 0
    for start, end in encoding.offsets:
        pieces.append(text[max(start, cursor):end])
        cursor = max(cursor, end)
    return encoding.ids, pieces


_VISIBLE = {" ": "␣", "\n": "↵", "\t": "→"}


def token_label(tokenizer: TextTokenizer, token_id: int) -> str:
    """One token as readable text: spaces as ``␣``, newlines as ``↵``, tabs as ``→``, other control characters
    escaped (``\\x0f``)."""
    text = tokenizer.decode([token_id])
    label = "".join(_VISIBLE.get(c, c if c.isprintable() else ascii(c)[1:-1]) for c in text)
    return label or f"<{token_id}>"


# ------------------------------------------------------------------------------------------------------ HTML
_CSS = """body {{ font-family: system-ui, sans-serif; max-width: 62em; margin: 2em auto; padding: 0 1em; }}
.tokens {{ font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 2; }}
.tokens span {{ border-radius: 3px; padding: 2px 0; box-shadow: inset -1px 0 #ffffff; }}
.legend span {{ font-family: ui-monospace, monospace; border-radius: 3px; padding: 2px 8px; margin-right: 4px; }}
{classes}"""


def depth_html(sections: list[DepthSection], num_recursions: int, title: str, subtitle: str = "") -> str:
    """A standalone HTML page: a legend, then per section the tokens as ``<span class="depth-d">`` (d = steps
    run), with the depth in each span's tooltip. Newlines show as ``↵`` before the line break."""
    colors = depth_colors(num_recursions)
    classes = "\n".join(f".depth-{d} {{ background: {c}; color: {text_color(c)}; }}" for d, c in enumerate(colors))
    legend = " ".join(f'<span class="depth-{d}">{d}</span>' for d in range(1, num_recursions + 1))
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>\n{_CSS.format(classes=classes)}\n</style>", "</head>",
        "<body>", f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p>{html.escape(subtitle)}</p>")
    parts.append(f'<p class="legend">Recursion steps per token: {legend}</p>')
    for section in sections:
        spans = "".join(
            f'<span class="depth-{d}" title="depth {d}">{html.escape(piece.replace(chr(10), "↵" + chr(10)))}</span>'
            for piece, d in zip(section.pieces, section.depths))
        parts += [f"<h2>{html.escape(section.title)}</h2>", f'<div class="tokens">{spans}</div>']
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ PNG
_FONT_SIZE = 11.0  # points; the layout below works in points (1/72 inch)
_LINE = 2.0 * _FONT_SIZE
_PAD = 2.0  # horizontal padding inside a box
_MARGIN = 14.0


@dataclass
class _Box:
    x: float
    y: float  # baseline, measured downwards from the top
    width: float
    label: str
    depth: int


def _display(piece: str) -> tuple[str, bool, bool]:
    """Box label, whether a word gap precedes the box, whether a line break follows it."""
    newline = piece.endswith("\n")
    label = piece.replace("\n", "↵").replace("\t", "→")
    if label.strip(" "):
        gap = label.startswith(" ")
        return label.strip(" "), gap, newline
    return "␣" * len(label), False, newline


def _width(label: str, font: FontProperties) -> float:
    width, _, _ = text_to_path.get_text_width_height_descent(label, font, ismath=False)
    return width


def _layout(pieces: list[str], depths: list[int], font: FontProperties, x0: float, y: float,
            right: float) -> tuple[list[_Box], float]:
    """Place token boxes left to right, wrapping at ``right``; returns the boxes and the last baseline."""
    boxes, x = [], x0
    gap = _width("n", font) * 0.6
    for piece, depth in zip(pieces, depths):
        label, spaced, newline = _display(piece)
        width = _width(label, font) + 2 * _PAD
        start = x + (gap if spaced and x > x0 else 0.0)
        line_break_only = newline and not label.strip("↵")  # may hang into the margin rather than wrap alone
        if start + width > right and x > x0 and not line_break_only:
            y, start = y + _LINE, x0
        boxes.append(_Box(start, y, width, label, depth))
        x = start + width + 1.0
        if newline:
            y, x = y + _LINE, x0
    return boxes, y


def depth_png(sections: list[DepthSection], num_recursions: int, path: str | Path, title: str,
              width_inches: float = 10.0) -> Path:
    """Draw the sections one below the other: a title, a legend of depth colours, then the wrapped tokens."""
    font = FontProperties(family="DejaVu Sans", size=_FONT_SIZE)
    bold = FontProperties(family="DejaVu Sans", size=_FONT_SIZE + 1, weight="bold")
    colors = depth_colors(num_recursions)
    right = width_inches * 72 - _MARGIN
    texts: list[tuple[float, float, str, FontProperties]] = [(_MARGIN, _MARGIN + _FONT_SIZE, title, bold)]
    legend_y = _MARGIN + _FONT_SIZE + _LINE
    texts.append((_MARGIN, legend_y, "Recursion steps:", font))
    x = _MARGIN + _width("Recursion steps:", font) + 8
    legend = []
    for depth in range(1, num_recursions + 1):
        label = f" {depth} "
        legend.append(_Box(x, legend_y, _width(label, font) + 2 * _PAD, label, depth))
        x += legend[-1].width + 4
    boxes, y = list(legend), legend_y + 0.5 * _LINE
    for section in sections:
        y += 1.5 * _LINE
        texts.append((_MARGIN, y, section.title, bold))
        placed, y = _layout(section.pieces, section.depths, font, _MARGIN, y + _LINE, right)
        boxes += placed
    height = y + _LINE

    fig = new_figure(width_inches, height / 72)
    fig.set_layout_engine("none")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(0, width_inches * 72)
    ax.set_ylim(height, 0)
    for x, y, text, prop in texts:
        ax.text(x, y, text, fontproperties=prop, va="baseline", parse_math=False)
    for box in boxes:
        color = colors[box.depth]
        ax.add_patch(Rectangle((box.x, box.y - 0.95 * _FONT_SIZE), box.width, 1.35 * _FONT_SIZE, facecolor=color,
                               edgecolor="none"))
        ax.text(box.x + _PAD, box.y, box.label, fontproperties=font, color=text_color(color), va="baseline",
                parse_math=False)
    return save(fig, path)
