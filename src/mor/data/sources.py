"""Corpus sources: text documents from local files, folders and Hugging Face datasets.

A source is named by a string:

* a file: ``.txt`` (the whole file is one document), ``.jsonl`` (one JSON object a line, the document in
  its ``text`` field), either optionally compressed as ``.gz``, ``.xz`` or ``.zst``; or ``.parquet`` (the
  document in its ``text`` column);
* a folder: every such file below it, in sorted path order (other files are ignored), or a dataset written
  by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` reads split ``train`` unless ``?split=NAME`` is
  appended);
* ``hf:NAME?name=CONFIG&split=SPLIT&revision=REV&limit=N``: a Hugging Face Hub dataset, streamed (all options
  optional, split defaults to ``train``; ``limit`` reads its first ``N`` rows only, e.g. a slice of a corpus far
  larger than a training budget). ``NAME`` may also be a local folder of data files.

Bad input raises :class:`DataError` naming the file and line (or row).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

from mor.integrity import sha256_file

TEXT_SUFFIXES = (".txt", ".jsonl")
COMPRESSIONS = (".gz", ".xz", ".zst")
HF_PREFIX = "hf:"
_BATCH_ROWS = 1024


class DataError(ValueError):
    """Input data that cannot be read: the message says which file and line, and what to do."""


def missing_extra(package: str, what: str) -> ImportError:
    return ImportError(f"reading {what} needs the '{package}' package: pip install 'mor[data]' (or {package})")


def file_format(path: Path) -> tuple[str, str] | None:
    """``(format, compression)`` of a supported file name, e.g. ``("jsonl", ".xz")``; None if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet", ""
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    inner = suffixes[:-1] if compression else suffixes
    if inner and inner[-1] in TEXT_SUFFIXES:
        return inner[-1][1:], compression
    return None


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


@dataclass(frozen=True)
class Source:
    """A parsed source string: what kind it is, where it is and the files it reads (for local kinds)."""

    spec: str
    kind: str  # "files", "hf-disk" or "hf-hub"
    location: str
    options: dict[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this source's content: file names, sizes and sha256 (hub datasets: name and options)."""
        if self.kind == "hf-hub":
            return {"spec": self.spec}
        root = Path(self.location)
        return {"spec": self.spec, "files": [
            {"path": str(f.relative_to(root)) if f != root else f.name, "bytes": f.stat().st_size,
             "sha256": sha256_file(f)} for f in self.files]}

    def documents(self, text_field: str = "text") -> Iterator[str]:
        """The non-empty documents of this source, in a fixed order."""
        if self.kind == "files":
            for file in self.files:
                yield from _read_file(file, text_field)
        elif self.kind == "hf-disk":
            yield from _read_saved_dataset(self, text_field)
        else:
            yield from _read_hub_dataset(self, text_field)


def parse_source(spec: str | Path | Source) -> Source:
    """Resolve a source string (see the module docstring); missing paths and unknown formats raise DataError."""
    if isinstance(spec, Source):
        return spec
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        name, _, query = spec[len(HF_PREFIX):].partition("?")
        if not name:
            raise DataError(f"{spec!r}: give a dataset name after 'hf:', e.g. hf:HuggingFaceFW/fineweb-edu")
        options = _parse_options(spec, query, {"name", "split", "revision", "limit"})
        limit = options.get("limit")
        if limit is not None and not (limit.isdigit() and int(limit) > 0):
            raise DataError(f"{spec!r}: limit must be a positive number of rows, got {limit!r}")
        return Source(spec, "hf-hub", name, options)
    path, query = Path(spec), ""
    if not path.exists() and "?" in spec:  # "saved_dataset_dir?split=validation"
        location, _, query = spec.partition("?")
        path = Path(location)
    if not path.exists():
        raise DataError(f"source {spec!r} does not exist")
    if path.is_dir() and is_saved_dataset(path):
        files = tuple(sorted(f for f in path.rglob("*") if f.is_file()))
        return Source(spec, "hf-disk", str(path), _parse_options(spec, query, {"split"}), files)
    if query:
        raise DataError(f"{spec!r}: options after '?' apply only to saved Hugging Face datasets and hf: names")
    if path.is_file():
        if file_format(path) is None:
            raise DataError(f"{path}: unsupported file type; supported are .txt and .jsonl (optionally "
                            f".gz/.xz/.zst compressed) and .parquet")
        return Source(spec, "files", str(path), files=(path,))
    files = tuple(sorted(f for f in path.rglob("*") if f.is_file() and file_format(f) is not None
                         and not any(part.startswith(".") for part in f.relative_to(path).parts)))
    if not files:
        raise DataError(f"folder {path} holds no .txt, .jsonl(.gz/.xz/.zst) or .parquet files")
    return Source(spec, "files", str(path), files=files)


def iter_documents(source: str | Path | Source, text_field: str = "text") -> Iterator[str]:
    """Yield the text of every non-empty document of ``source``; a source without any raises DataError."""
    source = parse_source(source)
    count = 0
    for text in source.documents(text_field):
        count += 1
        yield text
    if count == 0:
        raise DataError(f"source {source.spec!r} holds no documents (its files are empty or every "
                        f"{text_field!r} is blank)")


def _parse_options(spec: str, query: str, allowed: set[str]) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = set(options) - allowed
    if unknown:
        raise DataError(f"{spec!r}: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return options


def _open_binary(path: Path, compression: str) -> IO[bytes]:
    if compression == ".gz":
        import gzip
        return gzip.open(path, "rb")
    if compression == ".xz":
        import lzma
        return lzma.open(path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError as error:
            raise missing_extra("zstandard", ".zst files") from error
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")


def _decode(data: bytes, path: Path, line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line += data.count(b"\n", 0, error.start)
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {data[error.start]:#04x}); re-encode the file as "
                        f"UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    fmt, compression = file_format(path) or ("", "")
    if fmt == "parquet":
        yield from _read_parquet(path, text_field)
        return
    line = 0
    try:
        with _open_binary(path, compression) as f:
            if fmt == "txt":
                text = _decode(f.read(), path, 1)
                if text.strip():
                    yield text
                return
            for line, raw in enumerate(f, start=1):
                if raw.strip():
                    text = _json_text(_decode(raw, path, line), path, line, text_field)
                    if text.strip():
                        yield text
    except (DataError, ImportError):
        raise
    except Exception as error:  # corrupt or truncated compression, unreadable file (errors differ by codec)
        where = f"{path}:{line + 1}" if line else str(path)
        raise DataError(f"{where}: cannot read: {type(error).__name__}: {error}") from error


def _json_text(line_text: str, path: Path, line: int, text_field: str) -> str:
    try:
        record = json.loads(line_text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{line}: not a JSON object ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}:{line}: no {text_field!r} field (found {fields}); "
                        f"choose the field with --text-field") from None
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{line}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _column_texts(values: list[Any], where: str, first_row: int, text_field: str) -> Iterator[str]:
    for row, text in enumerate(values, start=first_row):
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: row {row}: column {text_field!r} is {type(text).__name__}, not a string")
        if text.strip():
            yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise missing_extra("pyarrow", ".parquet files") from error
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
        raise DataError(f"{path}: not a readable parquet file: {error}") from error
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
                        f"choose it with --text-field")
    row = 1
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
        yield from _column_texts(batch.column(0).to_pylist(), str(path), row, text_field)
        row += batch.num_rows


def _hf_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError as error:
        raise missing_extra("datasets", what) from error
    return datasets


def _read_saved_dataset(source: Source, text_field: str) -> Iterator[str]:
    datasets = _hf_datasets("saved Hugging Face datasets")
    dataset = datasets.load_from_disk(source.location)
    if isinstance(dataset, datasets.DatasetDict):
        split = source.options.get("split", "train")
        if split not in dataset:
            raise DataError(f"{source.location} has no split {split!r} (splits: {sorted(dataset)}); "
                            f"append ?split=NAME to the source")
        dataset = dataset[split]
    elif "split" in source.options:
        raise DataError(f"{source.spec!r}: ?split= applies to a DatasetDict, but this folder holds one Dataset")
    if text_field not in dataset.column_names:
        raise DataError(f"{source.location}: no column {text_field!r} (columns: {dataset.column_names}); "
                        f"choose it with --text-field")
    row = 1
    for batch in dataset.select_columns([text_field]).iter(batch_size=_BATCH_ROWS):
        values = batch[text_field]
        yield from _column_texts(values, source.location, row, text_field)
        row += len(values)


def _read_hub_dataset(source: Source, text_field: str) -> Iterator[str]:
    datasets = _hf_datasets("Hugging Face Hub datasets")
    options = source.options
    dataset = datasets.load_dataset(source.location, options.get("name"), split=options.get("split", "train"),
                                    revision=options.get("revision"), streaming=True)
    if "limit" in options:
        dataset = dataset.take(int(options["limit"]))
    for row, record in enumerate(dataset, start=1):
        if text_field not in record:
            raise DataError(f"{source.spec}: row {row}: no {text_field!r} field (found {sorted(record)}); "
                            f"choose it with --text-field")
        yield from _column_texts([record[text_field]], source.spec, row, text_field)
