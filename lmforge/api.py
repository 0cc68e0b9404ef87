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

from lmforge.config import PRESET_NOTES, PRESETS, ModelConfig, load_run_config, save_yaml
from lmforge.data import CATALOG, Document, TokenShards, catalog_documents, read_documents
from lmforge.data import prepare as prepare_shards
from lmforge.data.quality import CleanConfig, summary_line
from lmforge.data.quality import clean as clean_records
from lmforge.errors import UserError
from lmforge.files import check_new_directory
from lmforge.tokenizer import DEFAULT_EOS, Tokenizer
from lmforge.tokenizer import train_tokenizer as train_bpe
from lmforge.train.checkpoint import ADAPTER_CONFIG


def read_source(data: str | Path | Sequence[Document], text_field: str = "text") -> list[Document]:
    """Documents from a catalog name, a path (file, folder, glob), or a list of Documents.

    `shakespeare` gives its 42 works whole; another catalog dataset (`lmforge data list`) gives the
    `text_field` of each record of its train split (its validation and test splits stay unseen).
    """
    from lmforge.data.datasets import DATASETS, load

    if not isinstance(data, (str, Path)):
        return list(data)
    name = str(data)
    if Path(data).exists() or (name not in CATALOG and name not in DATASETS):
        return read_documents(data, text_field=text_field)
    if name in CATALOG:
        return catalog_documents(name)
    records = load(name, "train")
    if text_field not in records[0]:
        raise UserError(f"dataset {name} has no field {text_field!r}; its fields are {', '.join(records[0])} "
                        f"(choose one with --text-field)")
    return [Document(f"{name}:{i + 1}", str(r[text_field])) for i, r in enumerate(records) if str(r[text_field])]


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


def load(
    src: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
):
    """A model with `model.tokenizer` attached, from any source `lmforge import` takes.

    `src` is a checkpoint or run directory, a Hugging Face model directory (GPT-2, Llama, Qwen2 or
    Mistral), a .gguf file, a catalog model (`smollm2-135m-instruct`) or a hub id (where the hub can be
    reached). Sources other than native checkpoints are converted in memory; nothing is written but the
    cache of GGUF conversions (`$LMFORGE_CACHE/converted/`).
    """
    from lmforge.models.convert import load_model, resolve_source
    from lmforge.train.checkpoint import load_checkpoint, resolve_checkpoint

    source = resolve_source(src, gguf_file)
    if source.kind == "lmforge":
        directory = resolve_checkpoint(source.path)
        if (directory / ADAPTER_CONFIG).is_file():
            return load_adapter(directory).to(device=device, dtype=dtype)
        return load_checkpoint(directory, device=device, dtype=dtype)
    model, _ = load_model(source)
    return model.to(device=device, dtype=dtype)


def load_adapter(directory: Path):
    """A LoRA checkpoint: its base model (any source `load` takes) with the adapters folded in."""
    from peft import PeftModel

    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import read_info

    base_source = read_info(directory).get("base")
    if not base_source:
        raise UserError(f"{directory} holds LoRA adapters but its lmforge.json names no base model")
    base = load(base_source)
    model = PeftModel.from_pretrained(base, directory).merge_and_unload()
    model.tokenizer = Tokenizer.load(directory)
    return model.eval()


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
    from lmforge.models.convert import load_model, resolve_source
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
    from lmforge.models.convert import export_hf

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


def pretrain(
    data: str | Path,
    out: str | Path,
    preset: str | None = None,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Pretrain a decoder on prepared token shards (`lmforge prepare`); return the run's summary.

    The model and training settings merge, in order: the preset, the YAML `config`, `overrides`
    (`{"model.n_layer": 4, "train.lr": 3e-4}`). `resume=True` continues the run in `out` exactly
    where its last checkpoint left it (train.* overrides may extend it, e.g. more steps).
    """
    from lmforge.models.decoder import Decoder, flops_per_token
    from lmforge.train.objectives import RandomWindows, bits_per_byte, evaluate_tokens
    from lmforge.train.trainer import Trainer

    out = Path(out)
    run_file = out / "run.yaml"
    shards = open_shards(data)
    if resume:
        if not run_file.is_file():
            raise UserError(f"cannot resume: {out} holds no run ({run_file} is missing)")
        model_overrides = [k for k in overrides or {} if not k.startswith("train.")]
        if preset or model_overrides:
            raise UserError("a resumed run keeps its model; only train.* settings may change")
        model_config, train_config = load_run_config(None, run_file, overrides)
    else:
        if (out / "checkpoint").exists() or run_file.exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        model_config, train_config = load_run_config(preset, config, overrides)
        model_config.vocab_size = shards.vocab_size
    if model_config.vocab_size < shards.vocab_size:
        raise UserError(f"the model's vocab_size ({model_config.vocab_size}) is smaller than the data's "
                        f"tokenizer ({shards.vocab_size} tokens)")
    block = model_config.block_size
    for split in ("train", "val"):
        shards.check_length(split, block)

    torch.manual_seed(train_config.seed)
    model = Decoder(model_config)
    val_tokens = shards.split("val")
    meta = shards.meta

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        result = evaluate_tokens(m, val_tokens, block, batch_size=train_config.batch_size,
                                 max_windows=train_config.eval_batches * train_config.batch_size,
                                 device=next(m.parameters()).device)
        return {"val_loss": result["loss"],
                "val_bpb": bits_per_byte(result["loss"], meta["val_tokens"], meta["val_bytes"])}

    trainer = Trainer(
        model, train_config, out,
        batches=RandomWindows(shards.split("train"), block, train_config.batch_size, train_config.seed),
        evaluate=evaluate,
        tokenizer=shards.tokenizer,
        info={"data": {"path": str(data), "fingerprint": meta["fingerprint"], "source": meta.get("source")},
              "parameters": model.num_parameters()},
        tokens_per_row=block,
        flops_per_token=flops_per_token(model_config, block),
    )
    if trainer.dist.main and not resume:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(run_file, model_config, train_config)
    summary = trainer.fit(resume=resume)
    trainer.finish(summary, title=f"{out.name}: {model.num_parameters():,} params")
    return {**summary, "out": str(out), "checkpoint": str(out / "checkpoint"), "loss_png": str(out / "loss.png")}


def open_shards(data: str | Path) -> TokenShards:
    path = Path(data)
    if not path.exists():
        raise UserError(f"no such data directory: {path} (make one with: lmforge prepare --data TEXT --out {path})")
    if not (path / "meta.json").is_file():
        raise UserError(f"{path} holds no prepared token shards (no meta.json); "
                        f"make them with: lmforge prepare --data {path} --out DIR")
    return TokenShards(path)


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

