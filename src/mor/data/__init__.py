"""Data pipeline: tokenizers, corpus sources, token shards and packed batches.

    tokenizer = load_tokenizer("tokenizer.json")                   # or train_tokenizer(...)
    prepare(["corpus/"], tokenizer, "data/")                         # memory-mapped token shards + index.json
    loader = PackedBatches(TokenShards("data/"), seq_len=2048, batch_size=8, seed=0)
    batch = next(loader)                                             # {"input_ids", "labels"}: LongTensor [8, 2048]
"""

from typing import TYPE_CHECKING

from mor._lazy import lazy_exports

if TYPE_CHECKING:
    from mor.data.packing import PackedBatches, document_ids, sequential_batches
    from mor.data.prepare import prepare, token_dtype
    from mor.data.sample import prepare_sample, sample_corpus_paths, sample_tokenizer_path
    from mor.data.shards import TokenShards, read_index
    from mor.data.sources import DataError, Source, iter_documents, parse_source
    from mor.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DataError", "PackedBatches", "Source", "TextTokenizer", "TokenShards", "document_ids", "iter_documents",
    "load_tokenizer", "parse_source", "prepare", "prepare_sample", "read_index", "sample_corpus_paths",
    "sample_tokenizer_path", "sequential_batches", "token_dtype", "train_tokenizer",
]
lazy_exports(__name__, {
    "mor.data.packing": ("PackedBatches", "document_ids", "sequential_batches"),
    "mor.data.prepare": ("prepare", "token_dtype"),
    "mor.data.sample": ("prepare_sample", "sample_corpus_paths", "sample_tokenizer_path"),
    "mor.data.shards": ("TokenShards", "read_index"),
    "mor.data.sources": ("DataError", "Source", "iter_documents", "parse_source"),
    "mor.data.tokenizer": ("TextTokenizer", "load_tokenizer", "train_tokenizer"),
})
