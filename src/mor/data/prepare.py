"""Tokenize corpus sources into memory-mapped token shards with a JSON index.

Layout of a prepared folder::

    index.json          written last: the folder is complete exactly when it exists
    tokenizer.json      copy of the tokenizer that made the shards (its sha256 is in the index)
    train-00000.bin     raw token ids (uint16 when the vocabulary fits, else uint32), documents back to back,
    train-00001.bin     each followed by the end-of-document token
    val-00000.bin

Every document is tokenized without special tokens and followed by one end-of-document token (id 0,
``<|endoftext|>``, for SmolLM2). The token stream of a split does not depend on the batch size or the number of
workers, and shards are cut at a fixed token count, so the same inputs always give the same bytes.

One process at a time prepares a folder (an OS lock on ``.lock``, see :class:`mor.outputs.FolderLock`). The index
records the SHA-256 of every shard: a re-run with the same inputs checks them before it says there is nothing to
do, and a folder that holds a dataset of other inputs is replaced only when asked (``overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from mor.data.sources import DataError, Source, iter_documents, parse_source
from mor.data.tokenizer import TOKENIZER_FILE, TextTokenizer, load_tokenizer
from mor.integrity import sha256_file
from mor.outputs import FolderLock, writable_folder

FORMAT = "mor-token-shards"
VERSION = 1
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB per uint16 shard
DEFAULT_VAL_FRACTION = 0.01
_BATCH_DOCUMENTS = 256
_OUTPUT_FILE = re.compile(r"^(train|val)-\d{5}\.bin(\.tmp)?$|^(index|tokenizer)\.json\.tmp$")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardWriter:
    """Appends one split's tokens to shards of ``shard_tokens`` tokens, each under a temporary name.

    ``commit()`` renames the finished shards to their final names; ``discard()`` deletes what this writer wrote
    (its temporary files, and the shards it committed), never a file it did not write.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.committed = 0  # shards renamed to their final names
        self.tokens = 0
        self.documents = 0
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()

    def _tmp_path(self, number: int) -> Path:
        return self.out_dir / f"{self.split}-{number:05d}.bin.tmp"

    def write(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        while tokens.size:
            if self._file is None:
                self._file = self._tmp_path(len(self.shards)).open("wb")
                self.shards.append({"file": f"{self.split}-{len(self.shards):05d}.bin", "tokens": 0})
            shard = self.shards[-1]
            piece, tokens = np.split(tokens, [min(tokens.size, self.shard_tokens - shard["tokens"])])
            data = piece.astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            shard["tokens"] += piece.size
            self.tokens += piece.size
            if shard["tokens"] == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._hash = hashlib.sha256()

    def commit(self) -> list[dict[str, Any]]:
        self._close()
        for number, shard in enumerate(self.shards):
            self._tmp_path(number).replace(self.out_dir / shard["file"])
            self.committed = number + 1
        return self.shards

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for number, shard in enumerate(self.shards):
            self._tmp_path(number).unlink(missing_ok=True)
            if number < self.committed:
                (self.out_dir / shard["file"]).unlink(missing_ok=True)


def _encode(tok: TextTokenizer, split: str, texts: list[str], dtype: np.dtype) -> tuple[str, np.ndarray, int]:
    """Tokens of ``texts`` back to back, each document followed by the end-of-document token."""
    eos = tok.eos_token_id
    ids = tok.encode_batch(texts)
    stream = np.empty(sum(len(doc) for doc in ids) + len(ids), dtype=dtype)
    position = 0
    for doc in ids:
        stream[position:position + len(doc)] = doc
        stream[position + len(doc)] = eos
        position += len(doc) + 1
    return split, stream, len(ids)


# A worker process loads the tokenizer once, at start.
_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer_file: str, eos_token: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = TextTokenizer(tokenizer_file, eos_token)


def _encode_in_worker(split: str, texts: list[str], dtype: np.dtype) -> tuple[str, np.ndarray, int]:
    assert _worker_tokenizer is not None, "_init_worker did not run"
    return _encode(_worker_tokenizer, split, texts, dtype)


def _labelled_documents(train: Sequence[Source], val: Sequence[Source], val_fraction: Fraction,
                        text_field: str) -> Iterator[tuple[str, str]]:
    """``(split, text)`` for every document. With a fraction, document i of the train sources goes to val when
    ``floor((i+1) f) > floor(i f)``: evenly spread, exactly ``floor(n f)`` of n, and decided without knowing n."""
    ordinal = 0
    num, den = val_fraction.numerator, val_fraction.denominator
    for source in train:
        for text in iter_documents(source, text_field):
            yield ("val" if (ordinal + 1) * num // den > ordinal * num // den else "train"), text
            ordinal += 1
    for source in val:
        for text in iter_documents(source, text_field):
            yield "val", text


def _tasks(documents: Iterator[tuple[str, str]], batch: int) -> Iterator[tuple[str, list[str]]]:
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split, text in documents:
        pending[split].append(text)
        if len(pending[split]) == batch:
            yield split, pending[split]
            pending[split] = []
    for split, texts in pending.items():
        if texts:
            yield split, texts


def _existing_index(out_dir: Path) -> dict[str, Any] | None:
    try:
        index = json.loads((out_dir / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("format") == FORMAT else None


def damaged_files(out_dir: Path, index: dict[str, Any]) -> list[str]:
    """The files of a prepared folder that are missing or differ from the index (size, then SHA-256)."""
    itemsize = np.dtype(index["dtype"]).itemsize
    expected: list[tuple[str, int | None, str]] = [
        (shard["file"], shard["tokens"] * itemsize, shard["sha256"])
        for split in index["splits"].values() for shard in split["shards"]]
    expected.append((TOKENIZER_FILE, None, index["tokenizer"]["sha256"]))
    damaged = []
    for name, size, sha256 in expected:
        file = out_dir / name
        if not file.is_file():
            damaged.append(f"{name} (missing)")
        elif size is not None and file.stat().st_size != size:
            damaged.append(f"{name} ({file.stat().st_size} bytes, expected {size})")
        elif sha256_file(file) != sha256:
            damaged.append(f"{name} (checksum differs)")
    return damaged


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def prepare(sources: Sequence[str | Path | Source], tokenizer: str | Path | TextTokenizer, out_dir: str | Path, *,
            val_sources: Sequence[str | Path | Source] = (), val_fraction: float | None = None,
            text_field: str = "text", workers: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``sources`` into token shards in ``out_dir`` and return the index.

    The validation split is either the given ``val_sources`` or every ``1/val_fraction``-th train document
    (default 1 %). ``workers > 1`` tokenizes in that many processes. When ``out_dir`` already holds a complete,
    intact preparation of the same inputs (same file contents, tokenizer and settings), nothing is redone; one of
    other inputs is replaced only with ``overwrite``. An interrupted or failed run leaves no index and, where it
    could clean up, no shards.
    """
    if not sources:
        raise ValueError("give at least one training source")
    if val_sources and val_fraction:
        raise ValueError("give either val_sources or val_fraction, not both")
    fraction = Fraction(0 if val_sources else DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction)
    fraction = fraction.limit_denominator(1_000_000)
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    train = [parse_source(s) for s in sources]
    val = [parse_source(s) for s in val_sources]
    dtype = token_dtype(tok.vocab_size)
    out_dir = Path(out_dir)

    settings = {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name, "text_field": text_field,
        "val_fraction": str(fraction) if not val else None, "shard_tokens": shard_tokens,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id},
        "sources": {"train": [s.fingerprint() for s in train], "val": [s.fingerprint() for s in val]},
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    writable_folder(out_dir, "output folder")
    with FolderLock(out_dir, "mor data prepare"):
        existing = _existing_index(out_dir)
        if existing is not None and existing.get("fingerprint") == fingerprint:
            damaged = damaged_files(out_dir, existing)
            if not damaged:
                if progress:
                    print(f"{out_dir} is already prepared from these inputs: nothing to do")
                return existing
            if progress:
                print(f"{out_dir}: {', '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''}; preparing it again")
        elif existing is not None and not overwrite:
            changed = [key for key in settings if existing.get(key) != settings[key]]
            raise DataError(f"{out_dir} already holds a dataset prepared from other inputs (different "
                            f"{', '.join(changed) or 'settings'}); pass --overwrite (overwrite=True) to replace it, "
                            "or choose another output folder")
        (out_dir / INDEX_FILE).unlink(missing_ok=True)  # from now on the folder is incomplete
        for stale in out_dir.iterdir():
            if _OUTPUT_FILE.match(stale.name):
                stale.unlink()
        writers = {split: ShardWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
        try:
            _tokenize_into(writers, _tasks(_labelled_documents(train, val, fraction, text_field), _BATCH_DOCUMENTS),
                           tok, dtype, workers, progress)
            if writers["train"].tokens == 0:
                raise DataError("no training documents: every document went to the validation split")
            if fraction and writers["val"].documents == 0:
                first = -(-fraction.denominator // fraction.numerator)
                raise DataError(f"the validation split is empty: {writers['train'].documents} documents with "
                                f"val_fraction={float(fraction):g} give none (the first validation document is "
                                f"number {first}); raise --val-fraction or pass --val")
            splits = {split: {"documents": w.documents, "tokens": w.tokens, "shards": w.commit()}
                      for split, w in writers.items()}
            index = dict(settings, fingerprint=fingerprint, splits=splits)
            _write_atomic(out_dir / TOKENIZER_FILE, tok.path.read_bytes())
            _write_atomic(out_dir / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
        except BaseException:
            for writer in writers.values():
                writer.discard()
            raise
        return index


def _tokenize_into(writers: dict[str, ShardWriter], tasks: Iterator[tuple[str, list[str]]], tok: TextTokenizer,
                   dtype: np.dtype, workers: int, progress: bool) -> None:
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, dynamic_ncols=True)

    def write(result: tuple[str, np.ndarray, int]) -> None:
        split, tokens, documents = result
        writers[split].write(tokens, documents)
        bar.update(documents)
        bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}", refresh=False)

    with bar:
        if workers <= 1:
            for split, texts in tasks:
                write(_encode(tok, split, texts, dtype))
            return
        # Documents are read here and tokenized in order by the pool, a bounded number of batches ahead.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(tok.path), tok.eos_token)) as pool:
            pending: deque = deque()
            for split, texts in tasks:
                pending.append(pool.submit(_encode_in_worker, split, texts, dtype))
                if len(pending) >= 2 * workers:
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())

