"""Corpus sources: every file format, folders, saved and streamed Hugging Face datasets, and clear errors."""

import gzip
import json
import lzma
from pathlib import Path

import pytest

from mor.data import DataError, iter_documents, parse_source

DOCS = ["First document.\nWith two lines.", "Second: ünïcödé ✓ and digits 2024.", "Third\n\n\nwith blank lines"]


def write_jsonl(path: Path, records: list, compression: str = "") -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if compression == ".gz":
        data = gzip.compress(data, mtime=0)
    elif compression == ".xz":
        data = lzma.compress(data)
    elif compression == ".zst":
        zstandard = pytest.importorskip("zstandard")
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("compression", ["", ".gz", ".xz", ".zst"])
def test_jsonl_in_every_compression(tmp_path, compression):
    records = [{"text": DOCS[0], "id": 1}, {"text": DOCS[1]}, {"text": "   "}, {"text": DOCS[2]}]
    path = write_jsonl(tmp_path / f"c.jsonl{compression}", records, compression)
    assert list(iter_documents(path)) == DOCS  # the blank text is skipped


def test_jsonl_blank_lines_and_other_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": DOCS[0]}) + "\n\n" + json.dumps({"content": DOCS[1]}) + "\n")
    assert list(iter_documents(path, text_field="content")) == DOCS[:2]


@pytest.mark.parametrize("compression", ["", ".gz", ".xz"])
def test_txt_file_is_one_document(tmp_path, compression):
    text = "Paragraph one.\n\nParagraph two stays in the same document.\n"
    data = text.encode()
    data = gzip.compress(data) if compression == ".gz" else lzma.compress(data) if compression == ".xz" else data
    path = tmp_path / f"doc.txt{compression}"
    path.write_bytes(data)
    assert list(iter_documents(path)) == [text]


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": [0, 1, 2, 3], "text": [DOCS[0], None, DOCS[1], DOCS[2]]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)
    assert list(iter_documents(tmp_path / "c.parquet")) == DOCS
    with pytest.raises(DataError, match=r"c\.parquet: no column 'body'.*\['id', 'text'\]"):
        list(iter_documents(tmp_path / "c.parquet", text_field="body"))


def test_folder_reads_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".cache").mkdir()
    (tmp_path / "b" / "2.txt").write_text(DOCS[2])
    (tmp_path / "a.txt").write_text(DOCS[0])
    write_jsonl(tmp_path / "b" / "1.jsonl.gz", [{"text": DOCS[1]}], ".gz")
    (tmp_path / "README.md").write_text("not a corpus file")
    (tmp_path / ".cache" / "x.txt").write_text("hidden, ignored")
    source = parse_source(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in source.files] == ["a.txt", "b/1.jsonl.gz", "b/2.txt"]
    assert list(iter_documents(tmp_path)) == DOCS


def test_saved_hugging_face_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    assert parse_source(tmp_path / "ds").kind == "hf-disk"
    assert list(iter_documents(tmp_path / "ds")) == DOCS

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:2]}),
                                   "validation": datasets.Dataset.from_dict({"text": DOCS[2:]})})
    splits.save_to_disk(tmp_path / "dd")
    assert list(iter_documents(tmp_path / "dd")) == DOCS[:2]
    assert list(iter_documents(f"{tmp_path / 'dd'}?split=validation")) == DOCS[2:]
    with pytest.raises(DataError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        list(iter_documents(f"{tmp_path / 'dd'}?split=test"))


def test_hf_prefix_streams_with_load_dataset(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "hub" / "train.parquet")
    source = parse_source(f"hf:{tmp_path / 'hub'}?split=train")
    assert (source.kind, source.options) == ("hf-hub", {"split": "train"})
    assert list(iter_documents(source)) == DOCS
    assert list(iter_documents(f"hf:{tmp_path / 'hub'}?limit=2")) == DOCS[:2]  # a slice of a large corpus
    with pytest.raises(DataError, match="limit must be a positive number of rows, got '0'"):
        parse_source(f"hf:{tmp_path / 'hub'}?limit=0")


def test_non_utf8_names_file_and_line(tmp_path):
    lines = [json.dumps({"text": "ok"}).encode(), json.dumps({"text": "fine"}).encode(), b'{"text": "caf\xe9"}']
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid UTF-8 \(byte 0xe9\)"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(b"line one\nline two \xff\n"))
    with pytest.raises(DataError, match=r"bad\.txt\.gz:2: not valid UTF-8"):
        list(iter_documents(tmp_path / "bad.txt.gz"))


def test_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: no 'text' field \(found \['body'\]\)"):
        list(iter_documents(path))
    path.write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'text' is int"):
        list(iter_documents(path))
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not a JSON object"):
        list(iter_documents(path))


def test_empty_missing_corrupt_and_unsupported_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl' holds no documents"):
        list(iter_documents(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match=r"missing\.jsonl' does not exist"):
        parse_source(tmp_path / "missing.jsonl")
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"c\.csv: unsupported file type"):
        parse_source(tmp_path / "c.csv")
    (tmp_path / "broken.jsonl.xz").write_bytes(lzma.compress(b'{"text": "x"}\n' * 1000)[:40])
    with pytest.raises(DataError, match=r"broken\.jsonl\.xz(:\d+)?: cannot read"):
        list(iter_documents(tmp_path / "broken.jsonl.xz"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"holds no \.txt, \.jsonl"):
        parse_source(tmp_path / "nothing")


def test_fingerprint_follows_content(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}])
    before = parse_source(path).fingerprint()
    assert before == parse_source(path).fingerprint()
    write_jsonl(path, [{"text": DOCS[1]}])
    assert parse_source(path).fingerprint() != before
