"""Generated tokens to text as they arrive, with stop strings.

Decoding each token alone breaks characters that span several byte-level tokens and tokenizers whose pieces depend
on the one before, so each new token is decoded together with a few before it and only the text it adds is kept
(the method of vLLM's incremental detokenizer). Text is held back while it ends in an incomplete character or
while its end could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of an incomplete character


class Detokenizer:
    """The text of one request's generated tokens. :meth:`feed` takes tokens until a stop string matches;
    :meth:`take` gives the text that is safe to send."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], end_token_ids: set[int]) -> None:
        self.decode = decode
        self.stop = list(stop)
        self.end_token_ids = end_token_ids
        self.tokens: list[int] = []  # decodable tokens (the end token is counted, not decoded)
        self.text = ""
        self.sent = 0  # characters of text given out
        self.stopped = False  # a stop string matched: the request is complete
        self._prefix = 0  # decoding context starts here
        self._read = 0  # tokens whose text is in self.text

    def feed(self, tokens: Sequence[int]) -> int:
        """Add generated tokens; how many were consumed (fewer when a stop string matched)."""
        for count, token in enumerate(tokens, start=1):
            if token in self.end_token_ids:
                continue
            self.tokens.append(token)
            before = len(self.text)
            self._decode(final=False)
            if self._match_stop(before):
                return count
        return len(tokens)

    def take(self, final: bool) -> str:
        """Text not given out yet; ``final``: the request has ended, hold nothing back."""
        if final and not self.stopped:
            self._decode(final=True)
        end = len(self.text) if final or self.stopped else len(self.text) - self._stop_prefix()
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _decode(self, final: bool) -> None:
        old = self.decode(self.tokens[self._prefix:self._read])
        new = self.decode(self.tokens[self._prefix:])
        if len(new) > len(old) and (final or not new.endswith(REPLACEMENT)):
            self.text += new[len(old):]
            self._prefix, self._read = self._read, len(self.tokens)

    def _match_stop(self, before: int) -> bool:
        """Cut the text before the first stop string that the new text completes."""
        if not self.stop:
            return False
        longest = max(map(len, self.stop))
        start = max(before - longest + 1, 0)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.stopped = True
        return True

    def _stop_prefix(self) -> int:
        """Length of the longest end of the text that begins a stop string."""
        unsent = len(self.text) - self.sent
        for n in range(min(max(map(len, self.stop), default=1) - 1, unsent), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0
