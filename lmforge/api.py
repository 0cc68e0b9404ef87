"""The Python twins of the CLI verbs: each `lmforge VERB` is a thin call of one function here.

    import lmforge
    tok = lmforge.train_tokenizer("corpus/", "runs/tok", vocab_size=8192)
    lmforge.prepare("corpus/", "runs/data", tokenizer="runs/tok")
    lmforge.pretrain("runs/data", "runs/small", preset="gpt-mini", overrides={"train.max_steps": 500})
    model = lmforge.load("runs/small")
    print(model.generate("ROMEO:", max_new_tokens=50)[0])
    lmforge.import_model("smollm2-135m-instruct", "runs/smollm2")   # or a Hugging Face directory, a .gguf
    lmforge.export("runs/smollm2", "runs/smollm2-hf")                # a directory transformers loads

A data source is a file, a folder or a glob of txt / jsonl / csv / parquet files, or the name of a
catalog dataset (`shakespeare`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.config import PRESET_NOTES, PRESETS, ModelConfig
from lmforge.data import Document
from lmforge.data import prepare as prepare_shards
from lmforge.data.quality import CleanConfig, summary_line
from lmforge.data.quality import clean as clean_records
from lmforge.data.sources import read_source
from lmforge.errors import UserError
from lmforge.files import check_new_directory
from lmforge.recipes.finetune import finetune
from lmforge.recipes.pretrain import pretrain
from lmforge.sources import load, load_adapter
from lmforge.tokenizer import DEFAULT_EOS, Tokenizer
from lmforge.tokenizer import train_tokenizer as train_bpe
from lmforge.train.checkpoint import ADAPTER_CONFIG

__all__ = ["export", "finetune", "generate", "import_model", "load", "merge", "model_table", "prepare", "pretrain",
           "read_source", "train_tokenizer"]


def train_tokenizer(
    data: str | Path | Sequence[Document],
    out: str | Path | None = None,
    vocab_size: int = 8192,
    special_tokens: Sequence[str] = (DEFAULT_EOS,),
    text_field: str = "text",
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `data`; save it as `out/tokenizer.json` when `out` is given."""
    docs = read_source(data, text_field)
    tokenizer = train_bpe((d.text for d in docs), vocab_size=vocab_size, special_tokens=special_tokens)
    if out is not None:
        tokenizer.save(out)
    return tokenizer


def prepare(
    data: str | Path | Sequence[Document],
    out: str | Path,
    tokenizer: str | Path | Tokenizer | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.1,
    text_field: str = "text",
    overwrite: bool = False,
    source_name: str | None = None,
    clean: CleanConfig | bool = True,
) -> dict[str, Any]:
    """Tokenize `data` into train/val token shards in `out`; return `meta.json`'s contents.

    The documents are cleaned first (`clean=True`: the default `CleanConfig`; a `CleanConfig`; or
    False for none): normalised, filtered and de-duplicated, with a report in `out/quality.json`
    that also counts validation documents leaked from training (see `lmforge.data.quality`).
    Without `tokenizer`, a byte-level BPE tokenizer of `vocab_size` is trained on the (cleaned) data.
    `source_name` is recorded in meta.json as where the data came from (default: `data` itself).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction = {val_fraction}; expected a value between 0 and 1")
    if clean is True:
        clean = CleanConfig()
    if clean:
        clean.validate()  # before reading: a bad threshold should not cost a read of the data
    docs = read_source(data, text_field)
    report = None
    if clean:
        docs, report = clean_records(docs, clean)
        if not docs:
            raise UserError(f"cleaning removed every document of {data} ({summary_line(report)}); "
                            "loosen the --clean.* settings or pass --no-clean")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.load(tokenizer)
    elif tokenizer is None:
        tokenizer = train_bpe((d.text for d in docs), vocab_size=vocab_size)
    return prepare_shards(docs, tokenizer, out, val_fraction=val_fraction, overwrite=overwrite,
                          source_name=source_name or (str(data) if isinstance(data, (str, Path)) else None),
                          quality=report)


def merge(checkpoint: str | Path, out: str | Path) -> Path:
    """Fold a LoRA checkpoint's adapters into its base weights: a plain native checkpoint in `out`."""
    from lmforge.train.checkpoint import read_info, resolve_checkpoint, save_checkpoint

    directory = resolve_checkpoint(checkpoint)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise UserError(f"{directory} holds no LoRA adapters ({ADAPTER_CONFIG} is missing); nothing to merge")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out (nothing was written)")
    model = load_adapter(directory)
    info = read_info(directory)
    save_checkpoint(out, model, info={"merged_from": str(directory), "base": info.get("base"),
                                      "parameters": model.num_parameters()})
    return out


def import_model(src: str | Path, out: str | Path, gguf_file: str | None = None) -> Path:
    """Convert a model (any source `load` takes) into a native checkpoint directory `out`; return `out`.

    `out` must not exist (nothing is ever written over); the checkpoint is written atomically and its
    lmforge.json records where the model came from.
    """
    from lmforge.interop import load_model, resolve_source
    from lmforge.train.checkpoint import load_checkpoint, read_info, save_checkpoint

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new OUT directory (nothing was written)")
    source = resolve_source(src, gguf_file)
    if source.kind == "lmforge":
        model = load_checkpoint(source.path)
        origin = {**source.origin, "info": read_info(source.path)}
    else:
        model, origin = load_model(source)
    save_checkpoint(out, model, info={"source": origin, "parameters": model.num_parameters()})
    return out


def export(checkpoint: str | Path, out: str | Path, format: str = "hf") -> Path:
    """Write a model (a checkpoint, or any source `load` takes) in another format; `hf`: a Hugging Face
    directory (config.json, model.safetensors, tokenizer files) that transformers' Auto classes load."""
    from lmforge.interop import export_hf

    if format != "hf":
        raise UserError(f"--format {format!r} is not supported; supported: hf")
    out = Path(out)
    check_new_directory(out)
    return export_hf(load(checkpoint), out)


def generate(model: Any, prompt: str | Sequence[str] = "", **options: Any) -> list[str]:
    """Generate from a loaded model or a checkpoint path: the model's own `generate(prompt, **options)`.

    Options as `lmforge.infer.generate.generate`; a seq2seq model reads `prompt` as its source texts.
    """
    if isinstance(model, (str, Path)):
        model = load(model)
    return model.generate(prompt, **options)


def model_table() -> list[dict[str, Any]]:
    """Each preset with its parameter count and the memory needed to train and to run it."""
    from lmforge.models.decoder import Decoder

    rows = []
    for name, values in PRESETS.items():
        config = ModelConfig(**values)
        with torch.device("meta"):
            n = Decoder(config).num_parameters()
        rows.append({"preset": name, "parameters": n, **memory_estimate(config, n), "note": PRESET_NOTES[name]})
    return rows


def memory_estimate(config: ModelConfig, parameters: int, batch_size: int = 8) -> dict[str, float]:
    """Rough GiB to train (AdamW, bf16 weights + fp32 master, activations) and to run (bf16, full KV cache)."""
    gib = 1024**3
    # bf16 weights and grads (4 B) + fp32 master, Adam m and v (12 B); activations ~ 34 * T * d bytes per
    # layer per sequence in bf16 (Korthikanti et al. 2022, no recomputation) + the head's chunked logits
    T, d = config.block_size, config.d_model
    activations = batch_size * config.n_layer * 34 * T * d
    train = 16 * parameters + activations
    kv_cache = 2 * config.n_layer * config.n_kv_head * config.head_dim * T * 2
    run = 2 * parameters + kv_cache
    return {"train_gib": round(train / gib, 2), "run_gib": round(run / gib, 2)}

