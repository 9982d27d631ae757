"""Tokenizers: load a Hugging Face ``tokenizer.json`` or train a byte-level BPE on a corpus.

The wrapper adds what the data pipeline needs beside encode/decode: the end-of-document token that separates
packed documents, the vocabulary size that decides the shard dtype, and a content hash that ties prepared
shards to the exact tokenizer that made them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mor.outputs import writable_file

# Tried in this order when no end-of-document token is named. SmolLM2 and GPT-2 use "<|endoftext|>" between
# pretraining documents (its Instruct tokenizer_config names "<|im_end|>" as eos, which is for chat turns).
TOKENIZER_FILE = "tokenizer.json"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
# The library needs about 100 bytes per character of one input (a 20 MB one-line document took 2.8 GB), so longer
# documents are tokenized in pieces of about this many characters (see _pieces).
PIECE_CHARS = 1 << 20
# Pieces are cut before a space followed by a letter: no token of the usual pre-tokenizers (GPT-2/Llama-3
# byte-level regexes, Metaspace, whitespace) spans such a point. Not before a digit: a Digits pre-tokenizer splits
# it off and leaves the whitespace before it to merge with what precedes. A tokenizer that fails the check on a
# probe text (e.g. one whose normalizer prepends "▁" to every input) gets its long documents whole.
_PROBE = ("It's 2024:  a test,\tof 12 cuts ½ Ⅳ  3;\nnew line \n word (x=1, y = [2, 3]) and  Ünïcödé  中文 words... "
          "end.  Next <|endoftext|> done ")


def resolve_tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` at ``path``: the file itself or the one inside a folder."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: give a tokenizer.json file or a folder that holds one")
    return file


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` (``.backend``, unchanged) with its end-of-document token, vocabulary size and
    file hash; :meth:`encode` is for corpus text."""

    def __init__(self, file: str | Path, eos_token: str | None = None) -> None:
        self.path = resolve_tokenizer_file(file)
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self.backend = Tokenizer.from_str(raw.decode("utf-8"))  # as saved: special-token strings map to their ids
            # For corpus text: a document that happens to contain "<|endoftext|>" must not get a document boundary.
            self._text_backend = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"{self.path} is not a valid tokenizer.json: {error}") from error
        self._text_backend.encode_special_tokens = True
        self.eos_token = eos_token or next((t for t in EOS_CANDIDATES if self.backend.token_to_id(t) is not None), None)
        if self.eos_token is None:
            raise ValueError(f"{self.path} has none of the end-of-document tokens {EOS_CANDIDATES}: "
                             "name the one to use with eos_token=...")
        eos_id = self.backend.token_to_id(self.eos_token)
        if eos_id is None:
            raise ValueError(f"end-of-document token {self.eos_token!r} is not in the vocabulary of {self.path}")
        self.eos_token_id: int = eos_id
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)
        self.splits_long_texts = all(self._encode([_PROBE])[0] == self._encode([_PROBE[:cut]])[0] +
                                     self._encode([_PROBE[cut:]])[0] for cut in _cuts(_PROBE))

    def encode(self, text: str) -> list[int]:
        """Token ids of corpus text: no special tokens added, and special-token strings in it read as plain text."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of many texts at once, in parallel in the library's Rust threads; a text longer than
        ``PIECE_CHARS`` is tokenized piece by piece (same ids, bounded memory)."""
        long = {i for i, text in enumerate(texts) if len(text) > PIECE_CHARS and self.splits_long_texts}
        short = [i for i in range(len(texts)) if i not in long]
        ids: list[list[int]] = [[] for _ in texts]
        for i, encoded in zip(short, self._encode([texts[i] for i in short])):
            ids[i] = encoded
        for i in sorted(long):
            for piece in _pieces(texts[i], PIECE_CHARS):
                ids[i] += self._encode([piece])[0]
        return ids

    def _encode(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self._text_backend, "encode_batch_fast", self._text_backend.encode_batch)  # no offsets
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"TextTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token!r}:{self.eos_token_id}, sha256={self.sha256[:12]}…)")


def _is_cut(text: str, i: int) -> bool:
    """Whether ``text`` may be cut before position ``i``: a space followed by a letter."""
    return text[i] == " " and i + 1 < len(text) and text[i + 1].isalpha()


def _cuts(text: str) -> list[int]:
    return [i for i in range(len(text)) if _is_cut(text, i)]


def _pieces(text: str, size: int) -> list[str]:
    """``text`` in pieces of at most ``size`` characters where the text allows (a stretch without a cut point
    stays whole), each cut before a space followed by a letter."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size + 1)  # the last cut point within reach
        while cut != -1 and not _is_cut(text, cut):
            cut = text.rfind(" ", start + 1, cut)
        if cut == -1:  # none: the first one after
            cut = text.find(" ", start + size + 1)
            while cut != -1 and not _is_cut(text, cut):
                cut = text.find(" ", cut + 1)
            if cut == -1:
                break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> TextTokenizer:
    """Load ``tokenizer.json`` (or a folder holding one), e.g. the SmolLM2 tokenizer or a trained one."""
    return TextTokenizer(path, eos_token)


def train_tokenizer(corpus_sources: Sequence[str | Path], vocab_size: int, out_path: str | Path, *,
                    text_field: str = "text", min_frequency: int = 2, eos_token: str = "<|endoftext|>",
                    progress: bool = True) -> TextTokenizer:
    """Train a byte-level BPE on the documents of ``corpus_sources`` and save it as ``tokenizer.json``.

    The pre-tokenizer is SmolLM2's (digits split one by one, then the GPT-2 byte-level regex), so every byte
    sequence is encodable and numbers never merge into multi-digit tokens. ``eos_token`` gets id 0.
    ``out_path`` is a folder (``tokenizer.json`` is written inside) or a path ending in ``.json``.
    """
    from mor.data.sources import iter_documents  # the sources module needs no tokenizer: no import cycle

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                         f"{len(alphabet) + 1} tokens (256 bytes and {eos_token!r})")
    out_path = Path(out_path)
    file = out_path if out_path.suffix == ".json" else out_path / TOKENIZER_FILE
    writable_file(file, "--out")  # before the corpus is read, not after
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eos_token],
                                  initial_alphabet=alphabet, show_progress=progress)
    documents = (doc for source in corpus_sources for doc in iter_documents(source, text_field=text_field))
    tokenizer.train_from_iterator(documents, trainer=trainer)

    tmp = file.with_name(file.name + ".tmp")
    tokenizer.save(str(tmp), pretty=True)
    tmp.replace(file)
    return TextTokenizer(file, eos_token)
