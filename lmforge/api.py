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
from typing import Any, Literal

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
from lmforge.sources import GENERATION_DTYPES, load, load_adapter
from lmforge.tokenizer import DEFAULT_EOS, Tokenizer
from lmforge.tokenizer import train_tokenizer as train_bpe
from lmforge.train.checkpoint import ADAPTER_CONFIG

__all__ = ["consolidate", "export", "finetune", "generate", "import_model", "load", "merge", "model_table", "prepare",
           "pretrain", "read_source", "train_tokenizer"]


def train_tokenizer(
    data: str | Path | Sequence[Document],
    out: str | Path | None = None,
    vocab_size: int = 8192,
    special_tokens: Sequence[str] = (DEFAULT_EOS,),
    text_field: str = "text",
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style: round-trips any UTF-8 text).

    Returns the tokenizer, saved as OUT/tokenizer.json.

    Args:
        data: the text: a file, folder or glob of txt/jsonl/csv/parquet files, or a catalog name
            (shakespeare); in Python also a list of Documents
        out: the directory to write tokenizer.json into (Python: None writes nothing)
        vocab_size: tokens in the vocabulary
        special_tokens: the special tokens; the first ends each document
        text_field: the jsonl field / csv or parquet column of the text
    """
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
    """Tokenize text into train/val token shards.

    Writes train.bin and val.bin (uint16 when the vocabulary fits, uint32 otherwise), tokenizer.json
    and meta.json (token and UTF-8 byte counts, a data fingerprint). Whole documents are held out for
    validation. The documents are cleaned first (`lmforge.data.quality`), with a report in
    OUT/quality.json. Returns meta.json's contents.

    Args:
        data: the text: a file, folder or glob of txt/jsonl/csv/parquet files, or a catalog name
            (shakespeare); in Python also a list of Documents
        out: the directory for the shards
        tokenizer: a tokenizer.json or a directory holding one (default: train one of vocab_size tokens
            on the cleaned data)
        vocab_size: the vocabulary of the tokenizer trained when no tokenizer is given
        val_fraction: the share of the text held out for validation
        text_field: the jsonl field / csv or parquet column of the text
        overwrite: replace shards already in out
        source_name: where the data came from, for meta.json (default: data itself)
        clean: normalise, filter and de-duplicate the documents (True: the default CleanConfig; a
            CleanConfig; False: no cleaning); the report also counts validation documents leaked from training
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
    """Fold LoRA adapters into the weights: a plain checkpoint of the base model.

    Returns the directory.

    Args:
        checkpoint: a LoRA fine-tuning run or checkpoint directory
        out: the checkpoint directory to create
    """
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


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """Turn the sharded checkpoint of an FSDP run (`sharded/`, --train.strategy fsdp) into a normal one.

    The shards are put together in this one process (no torchrun needed) and written with the model's
    whole weights, without the optimizer state. Returns the directory.

    Args:
        checkpoint: an FSDP run or checkpoint directory (one stopped before the end holds only shards)
        out: the checkpoint directory to create
    """
    from lmforge.train.checkpoint import SHARDED, load_checkpoint, read_info, resolve_checkpoint, save_checkpoint

    directory = resolve_checkpoint(checkpoint)
    if not (directory / SHARDED).is_dir():
        raise UserError(f"{directory} holds no FSDP shards ({SHARDED}/ is missing); it is a normal checkpoint already")
    out = Path(out)
    check_new_directory(out)
    save_checkpoint(out, load_checkpoint(directory), info={**read_info(directory), "consolidated_from": str(directory)})
    return out


def import_model(source: str | Path, out: str | Path, gguf_file: str | None = None, dequantize: bool = False) -> Path:
    """Convert a Hugging Face or GGUF model into an lmforge checkpoint directory.

    Supported: GPT-2, Llama (SmolLM), Qwen2 and Mistral checkpoints, and GGUF files of them. A GGUF
    file's 4-bit layers (Q4_0, Q4_1, Q4_K) stay 4-bit (lmforge's int4 layers hold the very same codes;
    a Q8_0 or 4-bit output head becomes int8), unless --dequantize. OUT must not exist (nothing is ever
    written over); the checkpoint is written atomically and its lmforge.json records where the model
    came from. Returns the directory.

    Args:
        source: a Hugging Face model directory (config.json + weights), a .gguf file, a hub id
            (owner/name, where the hub can be reached), an lmforge checkpoint, or a catalog model
            (smollm2-135m-instruct)
        out: the checkpoint directory to create
        gguf_file: which .gguf file of SOURCE (a directory or hub id) to read
        dequantize: a GGUF file: every weight in fp32 (the 4-bit layers too)
    """
    from lmforge.interop import keep_gguf_quantization, load_model, resolve_source
    from lmforge.train.checkpoint import load_checkpoint, read_info, save_checkpoint

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new OUT directory (nothing was written)")
    resolved = resolve_source(source, gguf_file)
    if resolved.kind == "lmforge":
        model = load_checkpoint(resolved.path)
        origin = {**resolved.origin, "info": read_info(resolved.path)}
    else:
        model, origin = load_model(resolved)
    parameters = model.num_parameters()
    if resolved.kind == "gguf" and not dequantize:
        model.quantization = keep_gguf_quantization(model, resolved.path / resolved.gguf_file)
    save_checkpoint(out, model, info={"source": origin, "parameters": parameters})
    return out


def export(checkpoint: str | Path, out: str | Path, format: str = "hf",
           onnx_dtype: Literal["fp32", "int8"] = "fp32") -> Path:
    """Write a checkpoint in another format (hf: Hugging Face transformers; onnx: ONNX Runtime).

    hf: config.json, model.safetensors and tokenizer files that transformers' AutoModelForCausalLM
    and AutoTokenizer load. onnx: model.onnx (a decoder graph with past keys and values, Hugging
    Face's layout), config.json and the tokenizer, which `lmforge generate OUT` runs on onnxruntime
    (`lmforge.infer.onnx`; needs pip install 'lmforge[onnx]'). Returns the directory.

    Args:
        checkpoint: a checkpoint or run directory (or any source lmforge import takes)
        out: the directory to create (it must not exist, or be empty)
        format: the output format: hf or onnx
        onnx_dtype: onnx: the graph's weights: fp32, or int8 (onnxruntime's dynamic quantization of the matmuls)
    """
    from lmforge.interop import export_hf

    if format not in ("hf", "onnx"):
        raise UserError(f"--format {format!r} is not supported; supported: hf, onnx")
    if format == "hf" and onnx_dtype != "fp32":
        raise UserError(f"--onnx-dtype {onnx_dtype} applies to --format onnx only")
    out = Path(out)
    check_new_directory(out)
    model = load(checkpoint, dequantize=True)  # a quantized checkpoint goes out in float
    if format == "onnx":
        from lmforge.infer.onnx import export_onnx

        return export_onnx(model, out, onnx_dtype, source=str(checkpoint))
    return export_hf(model, out)


def generate(model: Any, prompt: str | Sequence[str] = "", device: str | torch.device = "auto",
             **options: Any) -> list[str]:
    """Generate from a loaded model or a checkpoint path: the model's own `generate(prompt, **options)`.

    Options as `lmforge.infer.generate.generate`; a seq2seq model reads `prompt` as its source texts.
    A path is loaded onto `device` (auto: a GPU where there is one); a loaded model generates where it is.
    """
    if isinstance(model, (str, Path)):
        model = generation_model(model, device=device)
    return model.generate(prompt, **options)


def generation_model(checkpoint: str | Path, engine: str = "auto", device: str | torch.device = "auto",
                     dtype: str | None = None) -> Any:
    """The model `lmforge generate` runs: a checkpoint on torch, or an ONNX export on onnxruntime.

    engine auto: onnxruntime for an ONNX export directory (`lmforge export --format onnx`), else torch;
    onnxruntime on a checkpoint runs its fp32 export, made once into $LMFORGE_CACHE/onnx/. `dtype`
    (fp32, bf16; None: the checkpoint's own) is torch's.
    """
    from lmforge.infer.onnx import cached_export, is_onnx_directory, load_onnx

    exported = is_onnx_directory(checkpoint)
    engine = ("onnxruntime" if exported else "torch") if engine == "auto" else engine
    if engine == "torch":
        if exported:
            raise UserError(f"{checkpoint} is an ONNX export; run it with --engine onnxruntime (or auto)")
        return load(checkpoint, device=device, dtype=GENERATION_DTYPES[dtype] if dtype else None)
    if engine != "onnxruntime":
        raise UserError(f"--engine {engine!r} is not supported; supported: auto, torch, onnxruntime")
    if dtype not in (None, "fp32"):
        raise UserError(f"--dtype {dtype}: the onnxruntime engine runs the export's own weights "
                        "(fp32, or int8 with lmforge export --onnx-dtype int8); use --dtype fp32")
    if str(device) not in ("auto", "cpu"):
        raise UserError(f"--device {device}: the onnxruntime engine runs on the CPU; use --device cpu")
    return load_onnx(checkpoint if exported else cached_export(checkpoint, lambda c: load(c, dequantize=True)))


def print_generation(
    checkpoint: str | Path,
    prompt: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    dtype: Literal["fp32", "bf16"] = "fp32",
    device: str = "auto",
    draft: str | None = None,
    draft_tokens: int = 4,
    engine: Literal["auto", "torch", "onnxruntime"] = "auto",
) -> None:
    """Continue a prompt (--prompt, or standard input) and stream the text.

    Batched generation with a KV cache; past the model's context it keeps going with a sliding
    window. Several samples are printed one after the other, each under a `--- sample i ---` line.

    Args:
        checkpoint: a checkpoint or run directory (or any model lmforge.load takes)
        prompt: the text to continue (default: standard input when it is piped, else an unconditional sample)
        max_new_tokens: the tokens to generate
        temperature: 0 = greedy
        top_k: sample from the k most likely tokens
        top_p: sample from the smallest set of tokens with this probability
        repetition_penalty: above 1 discourages repeats
        stop: stop when this text appears (repeatable)
        seed: the seed of the sampling (default: a fresh one)
        num_samples: samples of the prompt
        dtype: the weights' dtype while generating: bf16 keeps them in half the memory and is faster on
            CPUs with avx512_bf16 or AMX (the numbers differ from fp32 by bf16 rounding)
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
        draft: speculative decoding: a smaller model's checkpoint with the same tokenizer, or prompt-lookup
            (drafts copied from the prompt); the same text when greedy, the same distribution when sampling
        draft_tokens: the tokens drafted per step of the model (with --draft)
        engine: what runs the model: torch, onnxruntime (an ONNX export; a checkpoint is exported once to
            a cache) or auto (onnxruntime for a directory written by lmforge export --format onnx, else torch)
    """
    import sys

    from lmforge.infer.speculative import PROMPT_LOOKUP, check_draft

    if prompt is None:
        prompt = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    model = generation_model(checkpoint, engine, device, dtype)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, stop=stop or [], seed=seed)
    if draft is not None:
        if draft_tokens < 1:
            raise UserError(f"--draft-tokens = {draft_tokens}; expected >= 1")
        drafter = draft if draft == PROMPT_LOOKUP else load(draft, device=device, dtype=GENERATION_DTYPES[dtype])
        check_draft(model, drafter, draft_tokens)
        options.update(draft=drafter, draft_tokens=draft_tokens)
    if num_samples == 1:
        print(prompt, end="", flush=True)
        model.generate(prompt, stream=True, **options)
        print()
    else:
        for i, text in enumerate(model.generate(prompt, num_samples=num_samples, **options)):
            print(f"--- sample {i + 1} ---\n{prompt}{text}")


def print_models() -> None:
    """List the model presets with their sizes and the memory to train and to run them.

    Presets from a quarter of a million parameters to GPT-2 124M / 350M and a 1.2B Llama 3.2 shape.
    """
    header = f"{'preset':<14}{'parameters':>14}{'train GiB':>11}{'run GiB':>9}  note"
    print(header)
    print("-" * len(header))
    for r in model_table():
        print(f"{r['preset']:<14}{r['parameters']:>14,}{r['train_gib']:>11.2f}{r['run_gib']:>9.2f}  {r['note']}")
    print("\ntrain GiB: bf16 weights + fp32 AdamW state + activations at batch 8 and full context;"
          "\nrun GiB: bf16 weights + a full KV cache for one sequence.")


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

