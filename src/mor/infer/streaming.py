"""Streaming generated tokens as they are produced.

``generate(..., streamer=s)`` calls ``s.put(prompt_ids)`` once, then ``s.put(new_ids)`` after every step and
``s.end()`` at the end, as Hugging Face streamers expect (so ``transformers.TextStreamer`` works for one
prompt). A :class:`Streamer` also receives the recursion depth that produced each new token.
"""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from torch import Tensor

# ANSI foreground colours for depths 1, 2, 3, ... (the last one repeats for deeper tokens).
DEPTH_COLOURS = ("\033[34m", "\033[32m", "\033[33m", "\033[31m", "\033[35m", "\033[36m")
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


def depth_colour(depth: int) -> str:
    return DEPTH_COLOURS[min(max(depth, 1), len(DEPTH_COLOURS)) - 1]


class TextStreamer(Streamer):
    """Prints the text of one sequence as it grows; ``color_depth`` colours each piece by the depth that
    produced its token. Text is held back while it ends in an incomplete multi-byte character."""

    def __init__(self, tokenizer: Decoder, color_depth: bool = False, stream: TextIO | None = None,
                 stop_token_ids: set[int] | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.color_depth = color_depth
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
        if self.color_depth and self.depth is not None and piece:
            piece = depth_colour(self.depth) + piece + RESET
        self.stream.write(piece)
        self.stream.flush()

    def end(self) -> None:
        self._print(final=True)
        self.stream.write("\n")
        self.stream.flush()


def depth_legend(max_depth: int) -> str:
    """``depth: 1 2 3`` with each number in its colour."""
    return "depth: " + " ".join(depth_colour(d) + str(d) + RESET for d in range(1, max_depth + 1))
