"""Documents from wherever text comes from: a catalog name, a file, a folder, a glob, or a list in memory.

    docs = read_source("shakespeare")            # the 42 works, whole
    docs = read_source("corpus/*.txt")           # or .jsonl / .csv / .parquet (text_field)
    docs = read_source("rotten_tomatoes", "text")  # a catalog dataset: its train split's text field
    windows = calibration_sequences("kjv", tokenizer, samples=32, tokens=256)   # (32, 256) token ids
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.data.datasets import DATASETS, DOCUMENT_DATASETS, catalog_documents, load
from lmforge.data.readers import Document, read_documents
from lmforge.errors import UserError


def read_source(data: str | Path | Sequence[Document], text_field: str = "text") -> list[Document]:
    """Documents from a catalog name, a path (file, folder, glob), or a list of Documents.

    `shakespeare` gives its 42 works whole; another catalog dataset (`lmforge data list`) gives the
    `text_field` of each record of its train split (its validation and test splits stay unseen).
    """
    if not isinstance(data, (str, Path)):
        return list(data)
    name = str(data)
    if Path(data).exists() or name not in DATASETS:
        return read_documents(data, text_field=text_field)
    if name in DOCUMENT_DATASETS:
        return catalog_documents(name)
    records = load(name, "train")
    if text_field not in records[0]:
        raise UserError(f"dataset {name} has no field {text_field!r}; its fields are {', '.join(records[0])} "
                        f"(choose one with --text-field)")
    return [Document(f"{name}:{i + 1}", str(r[text_field])) for i, r in enumerate(records) if str(r[text_field])]


def calibration_sequences(data: str, tokenizer: Any, samples: int, tokens: int, text_field: str = "text"
                          ) -> torch.Tensor:
    """`samples` windows (samples, tokens) of token ids taken evenly from the text of `data`."""
    ids: list[int] = []
    for doc in read_source(data, text_field):
        ids += tokenizer.encode(doc.text) + [tokenizer.eos_id]
        if len(ids) >= 50 * samples * tokens:  # enough to spread the windows over
            break
    if len(ids) < tokens:
        raise UserError(f"--calib {data} has {len(ids)} tokens; expected at least --calib-tokens = {tokens}")
    all_ids = torch.tensor(ids)
    starts = torch.linspace(0, len(ids) - tokens, samples).long()
    return torch.stack([all_ids[s:s + tokens] for s in starts.tolist()])
