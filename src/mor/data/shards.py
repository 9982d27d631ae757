"""A read-only, memory-mapped view of one split of a prepared folder (see ``mor.data.prepare``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from mor.data.prepare import FORMAT, INDEX_FILE, SPLITS, TOKENIZER_FILE, VERSION
from mor.data.sources import DataError


def read_index(path: str | Path) -> dict[str, Any]:
    """The index of a prepared folder, checked for format and version."""
    file = Path(path) / INDEX_FILE
    if not file.is_file():
        hint = ("its preparation did not finish: run `mor data prepare` again"
                if Path(path).is_dir() and any(Path(path).glob("*.bin*")) else "prepare it with `mor data prepare`")
        raise FileNotFoundError(f"{path} is not a prepared token folder (no {INDEX_FILE}); {hint}")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); prepare the folder again") from error
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{file} is not a {FORMAT} v{VERSION} index (format={index.get('format')!r}, "
                         f"version={index.get('version')!r}); prepare the folder again with this version of mor")
    return index


class TokenShards:
    """The token stream of one split: its shards memory-mapped and read as one array.

    ``len()`` is the number of tokens. Opening checks that every shard exists with the size the index states;
    every read checks that the ids lie within the tokenizer's vocabulary (so corrupt bytes stop with a message
    naming the shard, not deep inside the model), which costs a comparison per token read.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.path = Path(path)
        self.split = split
        self.index = read_index(self.path)
        self.dtype = np.dtype(self.index["dtype"])
        info = self.index["splits"][split]
        if info["tokens"] == 0:
            raise ValueError(f"{self.path} has no {split} tokens; prepare it with --val-fraction or --val SOURCES"
                             if split == "val" else f"{self.path} has no train tokens")
        self.num_documents: int = info["documents"]
        self._arrays: list[np.memmap] = []
        for shard in info["shards"]:
            file = self.path / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                found = f"{file.stat().st_size} bytes" if file.is_file() else "missing"
                raise ValueError(f"shard {file} should hold {expected} bytes but is {found}; "
                                 f"prepare the folder again")
            self._arrays.append(np.memmap(file, dtype=self.dtype, mode="r"))
        # offsets[i] is the position of shard i's first token in the split's stream.
        self._offsets = np.cumsum([0] + [a.size for a in self._arrays])

    @property
    def eos_token_id(self) -> int:
        return int(self.index["tokenizer"]["eos_token_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """A copy of tokens ``[start, start + length)`` of the stream, across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) are outside the {len(self)} tokens of {self.split}")
        out = np.empty(length, dtype=self.dtype)
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        done = 0
        while done < length:
            begin = start + done - int(self._offsets[shard])
            take = min(length - done, self._arrays[shard].size - begin)
            out[done:done + take] = self._arrays[shard][begin:begin + take]
            if take and int(out[done:done + take].max()) >= self.vocab_size:
                self._corrupt(shard, begin, out[done:done + take])
            done += take
            shard += 1
        return out

    def _corrupt(self, shard: int, begin: int, tokens: np.ndarray) -> NoReturn:
        at = int(np.argmax(tokens >= self.vocab_size))
        file = self.path / self.index["splits"][self.split]["shards"][shard]["file"]
        raise DataError(f"{file} holds token id {int(tokens[at])} at position {begin + at}, outside the "
                        f"{self.vocab_size} tokens of the tokenizer that prepared it: the shard is corrupt; check "
                        f"the folder with `mor data inspect {self.path} --verify` and prepare it again")

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.path)!r}, split={self.split!r}, tokens={len(self):,}, "
                f"documents={self.num_documents:,}, dtype={self.dtype.name})")
