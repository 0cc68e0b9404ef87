"""Every source a model is loaded from, behind one function: `load(src)`.

    model = load("runs/x")                      # a checkpoint or run directory (LoRA runs: base + adapters)
    model = load("smollm2-135m-instruct")       # a catalog model, a Hugging Face directory, a .gguf, a hub id
    model = load("runs/x-enc", key="data.key")  # an encrypted checkpoint, decrypted in memory (lmforge.crypto)

Native checkpoints are read by `lmforge.train.checkpoint`; every other source is converted in memory
by `lmforge.interop` (only the GGUF conversion cache is written, under `$LMFORGE_CACHE`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge import crypto
from lmforge.devices import resolve_device
from lmforge.errors import UserError
from lmforge.kernels.quantized import dequantize_layers
from lmforge.train.checkpoint import ADAPTER_CONFIG

GENERATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the --dtype choices of generate and chat


def load(
    src: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
    dequantize: bool = False,
    key: crypto.Key | str | Path | None = None,
):
    """A model with `model.tokenizer` attached, from any source `lmforge import` takes, on `device` (cpu,
    auto, cuda, cuda:N or mps: `lmforge.devices.resolve_device`; the verbs pass their --device).

    `src` is a checkpoint or run directory, a Hugging Face model directory (GPT-2, Llama, Qwen2 or
    Mistral), a .gguf file, a catalog model (`smollm2-135m-instruct`) or a hub id (where the hub can be
    reached). Sources other than native checkpoints are converted in memory; nothing is written but the
    cache of GGUF conversions (`$LMFORGE_CACHE/converted/`). A quantized checkpoint (`lmforge quantize`,
    a GGUF import) keeps its int8/int4 layers, or with `dequantize` gets them back in fp32 (to train or
    export it).

    `key`: the key file (or `crypto.Key`) of an encrypted checkpoint, which is then decrypted in memory
    only; a checkpoint that is not encrypted is refused. Without it, the process's reading key is used
    (`crypto.reading_key`, the CLI's --key-file, LMFORGE_KEY_FILE).
    """
    if key is not None:
        with crypto.reading_key(key):
            return _load(src, device, dtype, gguf_file, dequantize, must_be_encrypted=True)
    return _load(src, device, dtype, gguf_file, dequantize)


def _load(src, device, dtype, gguf_file, dequantize, must_be_encrypted: bool = False):
    from lmforge.interop import load_model, resolve_source
    from lmforge.train.checkpoint import CONFIG, load_checkpoint, resolve_checkpoint, verified_checkpoint

    if must_be_encrypted:
        config = resolve_checkpoint(src) / CONFIG
        if not crypto.is_encrypted(config):
            raise UserError(f"{config} is not encrypted, but a key was given; load it without key=")
    device = resolve_device(device)  # a missing GPU is an error before anything is read
    source = resolve_source(src, gguf_file)
    if source.kind == "lmforge":
        directory = verified_checkpoint(source.path)
        if (directory / ADAPTER_CONFIG).is_file():
            return load_adapter(directory).to(device=device, dtype=dtype)
        model = load_checkpoint(directory, device=device)
        if dequantize:
            dequantize_layers(model)
        return model.to(dtype=dtype) if dtype is not None else model
    model, _ = load_model(source)
    return model.to(device=device, dtype=dtype)


def load_adapter(directory: Path):
    """A LoRA checkpoint: its base model (any source `load` takes) with the adapters folded in."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import ADAPTER_WEIGHTS, load_tensors, read_info

    base_source = read_info(directory).get("base")
    if not base_source:
        raise UserError(f"{directory} holds LoRA adapters but its lmforge.json names no base model")
    base = load(base_source, dequantize=True)  # adapters are trained on (and merged into) float weights
    # peft's files read through lmforge.crypto (an encrypted run's adapters stay in memory)
    config = PeftConfig.from_peft_type(**json.loads(crypto.read_bytes(directory / ADAPTER_CONFIG)))
    config.inference_mode = True
    model = PeftModel(base, config)
    set_peft_model_state_dict(model, load_tensors(directory / ADAPTER_WEIGHTS))
    model = model.merge_and_unload()
    model.tokenizer = Tokenizer.load(directory)
    return model.eval()
