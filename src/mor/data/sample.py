"""The sample corpus and tokenizer shipped with the package, so the quickstart needs nothing else.

The corpus is Shakespeare's plays and poems (public domain), built by ``scripts/build_sample_corpus.py``:
``sample-train.jsonl.xz`` and ``sample-val.jsonl.xz`` (Macbeth and Twelfth Night), one work a document;
``sample-tokenizer.json`` is a 4,096-token byte-level BPE trained on the train file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mor.data.prepare import prepare

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def sample_corpus_paths() -> dict[str, Path]:
    """The bundled corpus files: ``{"train": ..., "val": ...}`` (JSON Lines, xz, a ``text`` field)."""
    return {split: ASSETS / f"sample-{split}.jsonl.xz" for split in ("train", "val")}


def sample_tokenizer_path() -> Path:
    """The bundled 4,096-token byte-level BPE tokenizer (``<|endoftext|>`` = 0) trained on the sample corpus."""
    return ASSETS / "sample-tokenizer.json"


def prepare_sample(out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Tokenize the sample corpus with the sample tokenizer into ``out_dir``; returns the index."""
    paths = sample_corpus_paths()
    return prepare([paths["train"]], sample_tokenizer_path(), out_dir, val_sources=[paths["val"]], **kwargs)
