"""Streaming generated tokens as they are produced.

``generate(..., streamer=s)`` calls ``s.put(prompt_ids)`` once, then ``s.put(new_ids)`` after every step and
``s.end()`` at the end, as Hugging Face streamers expect (so ``transformers.TextStreamer`` works for one
prompt). A :class:`Streamer` also receives the recursion depth that produced each new token.
"""

from __future__ import annotations

import re
import sys
from typing import Protocol, TextIO

from torch import Tensor

# Viridis at 0, 1/8, ..., 1: the depth colours of the terminal, the HTML and the PNGs (mor.viz.style) alike.
_VIRIDIS = ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725")
UNROUTED = "#d9d9d9"  # depth 0: the token never ran the shared block
RESET = "\033[0m"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class Streamer:
    """Base class of streamers that also want depths: override :meth:`on_tokens`."""

    def __init__(self) -> None:
        self._prompt_seen = False

    def put(self, value: Tensor, depths: Tensor | None = None) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.on_tokens(value.reshape(-1).tolist(), None if depths is None else depths.reshape(-1).tolist())

    def on_tokens(self, tokens: list[int], depths: list[int] | None) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass


def depth_palette(num_recursions: int) -> list[str]:
    """Hex colours of depths 0..Nr: depth 0 grey, then light (shallow) to dark (deep) along viridis, which
    colour-blind readers tell apart."""
    colours = [UNROUTED]
    for d in range(1, num_recursions + 1):
        t = 0.9 - 0.8 * (d - 1) / max(num_recursions - 1, 1)  # from 0.9 (depth 1) down to 0.1 (depth Nr)
        i = min(int(t * 8), 7)
        low, high = _rgb(_VIRIDIS[i]), _rgb(_VIRIDIS[i + 1])
        colours.append("#" + "".join(f"{round(a + (b - a) * (t * 8 - i)):02x}" for a, b in zip(low, high)))
    return colours


def text_colour(background: str) -> str:
    """Black or white, whichever contrasts more with ``background`` (WCAG relative luminance)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (v / 255 for v in _rgb(background))]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    # Contrast ratios: with black (L + 0.05) / 0.05, with white 1.05 / (L + 0.05).
    return "#000000" if (luminance + 0.05) ** 2 > 0.05 * 1.05 else "#ffffff"


def depth_colour(depth: int, num_recursions: int) -> str:
    """The ANSI codes that paint text as ``depth`` is painted in the HTML and PNG views: on its colour, in
    black or white (24-bit colour; deeper than ``num_recursions`` looks like the deepest)."""
    background = depth_palette(num_recursions)[min(max(depth, 0), num_recursions)]
    return "\033[48;2;{};{};{}m\033[38;2;{};{};{}m".format(*_rgb(background), *_rgb(text_colour(background)))


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


class TextStreamer(Streamer):
    """Prints the text of one sequence as it grows; ``color_depth`` colours each piece by the depth that
    produced its token. Text is held back while it ends in an incomplete multi-byte character."""

    def __init__(self, tokenizer: Decoder, color_depth: bool = False, stream: TextIO | None = None,
                 stop_token_ids: set[int] | None = None, num_recursions: int = 3) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.color_depth = color_depth
        self.num_recursions = num_recursions  # the model's: it sets the colour scale
        self.stream = stream or sys.stdout
        self.stop_token_ids = stop_token_ids or set()
        self.tokens: list[int] = []
        self.printed = ""
        self.depth: int | None = None  # of the latest token

    def on_tokens(self, tokens: list[int], depths: list[int] | None) -> None:
        if len(tokens) != 1:
            raise ValueError(f"TextStreamer prints one sequence; got a batch of {len(tokens)}")
        if tokens[0] in self.stop_token_ids:
            return
        self.tokens.append(tokens[0])
        self.depth = None if depths is None else depths[0]
        self._print(final=False)

    def _print(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") and not final:
            return
        piece = text[len(self.printed):]
        self.printed = text
        if self.color_depth and self.depth is not None:
            # Whitespace stays unpainted: a painted newline would fill the next line with the colour.
            colour = depth_colour(self.depth, self.num_recursions)
            piece = re.sub(r"\S+", lambda match: colour + match.group() + RESET, piece)
        self.stream.write(piece)
        self.stream.flush()

    def end(self) -> None:
        self._print(final=True)
        self.stream.write("\n")
        self.stream.flush()


def depth_legend(num_recursions: int) -> str:
    """``depth: 1 2 3`` with each number in its colour."""
    return "depth: " + " ".join(depth_colour(d, num_recursions) + f" {d} " + RESET
                                for d in range(1, num_recursions + 1))
