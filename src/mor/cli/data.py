"""``mor data prepare | inspect | sample`` and ``mor tokenizer train``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mor.cli.common import non_negative_int, positive_int

SOURCES_HELP = ("files (.txt = one document; .jsonl with a text field; either may end in .gz/.xz/.zst; .parquet), "
                "folders of them, folders written by datasets' save_to_disk (append ?split=NAME for a "
                "DatasetDict), or hf:NAME?name=CONFIG&split=SPLIT for a streamed Hugging Face Hub dataset")


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare and inspect token shards")
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = data_commands.add_parser("prepare", help="tokenize corpora into memory-mapped token shards",
                                 description="Tokenize SOURCES into OUT: uint16/uint32 token shards, a copy of the "
                                             "tokenizer and index.json (written last). Re-running with the same "
                                             "inputs checks the shards and does nothing else; a folder prepared "
                                             "from other inputs is replaced only with --overwrite.")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding one")
    p.add_argument("--out", required=True, help="output folder")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=None,
                       help="send every 1/F-th document to the validation split (default 0.01)")
    split.add_argument("--val", action="append", default=[], metavar="SOURCE",
                       help="a validation source instead (repeat for several)")
    _common_options(p)
    p.add_argument("--eos-token", default=None, help="end-of-document token (default: <|endoftext|> or </s>)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="tokenizer processes; 1 tokenizes in this process with the library's threads (default)")
    p.add_argument("--shard-tokens", type=positive_int, help="tokens per shard file (default 2^28: 512 MiB as uint16)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset of other inputs already in OUT")
    p.set_defaults(func=_prepare)

    p = data_commands.add_parser("inspect", help="print the summary of a prepared folder")
    p.add_argument("dir", help="prepared folder")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256")
    p.add_argument("--show", type=non_negative_int, default=0, metavar="N", help="decode the first N train tokens")
    p.set_defaults(func=_inspect)

    p = data_commands.add_parser("sample", help="prepare the bundled sample corpus with the bundled tokenizer")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset of other inputs already in OUT")
    p.set_defaults(func=_sample)

    tokenizer = subparsers.add_parser("tokenizer", help="train tokenizers")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    p = tokenizer_commands.add_parser("train", help="train a byte-level BPE tokenizer")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json is written inside) or .json path")
    p.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often")
    _common_options(p)
    p.set_defaults(func=_train_tokenizer)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-field", default="text", help="JSON field or column holding the text (default text)")


def _prepare(args: argparse.Namespace) -> int:
    from mor.data.prepare import prepare  # numpy and tokenizers: imported when a command runs, not for --help
    from mor.data.tokenizer import load_tokenizer

    shard_tokens = {"shard_tokens": args.shard_tokens} if args.shard_tokens else {}
    index = prepare(args.sources, load_tokenizer(args.tokenizer, args.eos_token), args.out, val_sources=args.val,
                    val_fraction=args.val_fraction, text_field=args.text_field, workers=args.workers,
                    overwrite=args.overwrite, **shard_tokens)
    print(_summary(index))
    return 0


def _summary(index: dict) -> str:
    tok = index["tokenizer"]
    lines = [(f"tokenizer: vocab {tok['vocab_size']:,}, eos {tok['eos_token']!r} = {tok['eos_token_id']}, "
              f"sha256 {tok['sha256'][:16]}…; dtype {index['dtype']}")]
    for split, info in index["splits"].items():
        lines.append(f"{split:>5}: {info['documents']:>10,} documents {info['tokens']:>14,} tokens "
                     f"in {len(info['shards'])} shard(s)")
    for split, sources in index["sources"].items():
        lines += [f"{split:>5} source: {s['spec']} ({len(s.get('files', []))} file(s))" for s in sources]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from mor.data.prepare import damaged_files
    from mor.data.shards import TokenShards, read_index
    from mor.data.tokenizer import load_tokenizer

    index = read_index(args.dir)
    print(_summary(index))
    if args.verify:
        bad = damaged_files(Path(args.dir), index)
        print("verify: " + (f"{len(bad)} file(s) differ from the index: {', '.join(bad)}; prepare the folder again"
                            if bad else "all shards match"))
        if bad:
            return 1
    if args.show:
        shards = TokenShards(args.dir)
        tokens = shards.read(0, min(args.show, len(shards)))
        print(json.dumps(load_tokenizer(shards.tokenizer_path, index["tokenizer"]["eos_token"]).decode(tokens)))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from mor.data.sample import prepare_sample

    print(_summary(prepare_sample(args.out, overwrite=args.overwrite)))
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from mor.data.tokenizer import train_tokenizer

    tok = train_tokenizer(args.sources, args.vocab_size, args.out, text_field=args.text_field,
                          min_frequency=args.min_frequency)
    print(f"wrote {tok.path}: vocab {tok.vocab_size:,}, eos {tok.eos_token!r} = {tok.eos_token_id}, "
          f"sha256 {tok.sha256[:16]}…")
    return 0
