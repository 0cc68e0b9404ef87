"""Hugging Face's names and layouts for the models lmforge runs exactly: configs and weight key tables,
declarative and pure (PyTorch only, no files, no transformers), like torchtune's `_FROM_HF` maps.

    config = config_from_hf(json.load(open("gpt2/config.json")))   # a ModelConfig
    state = state_dict_from_hf(hf_state, config, "gpt2")            # lmforge names and layout, fp32
    hf_state = state_dict_to_hf(model.state_dict(), config)         # and back: transformers loads it
    hf_config = to_hf_config(config, bos_id=0, eos_id=0)            # the config.json that goes with it

Import and export (`lmforge.interop`, which reads and writes the files) and the benchmarks' transformers
twins of lmforge models (bench/common.py) all map weights with these tables; only the tests keep an
independent map, written by hand, to check them (tests/conftest.py).

Supported families (`SUPPORTED`): GPT-2 (GPT2LMHeadModel) and the Llama family: Llama (SmolLM2 is
one), Qwen2 (biases on q/k/v only) and Mistral (a sliding window: the imported model's context is
min(max_position_embeddings, sliding_window), within which full causal attention is exactly the
sliding-window attention). Each family's `KeyTable` names, for every lmforge weight, the Hugging Face
weights it is made of ("{}" is the layer number):

    ours                GPT-2                   Llama family
    tok_emb             wte                     embed_tokens
    pos_emb             wpe                     (RoPE: none)
    blocks.{}.norm1     h.{}.ln_1               layers.{}.input_layernorm
    blocks.{}.attn.qkv  h.{}.attn.c_attn (T)    layers.{}.self_attn.[q_proj; k_proj; v_proj]
    blocks.{}.attn.proj h.{}.attn.c_proj (T)    layers.{}.self_attn.o_proj
    blocks.{}.norm2     h.{}.ln_2               layers.{}.post_attention_layernorm
    blocks.{}.mlp.up    h.{}.mlp.c_fc (T)       layers.{}.mlp.[gate_proj; up_proj]
    blocks.{}.mlp.down  h.{}.mlp.c_proj (T)     layers.{}.mlp.down_proj
    norm                ln_f                    norm
    head                lm_head (only when untied)

[a; b]: several of theirs stacked by rows make one of ours. (T): GPT-2's Conv1D layers store weights
as (in, out), nn.Linear as (out, in), hence a transpose. Which of our weights exist (biases, learned
positions, an untied head) is read off the model itself: a Decoder of the config, built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.models.decoder import Decoder

SUPPORTED = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
"""Hugging Face model_type -> the transformers class whose checkpoints can be imported."""


def supported_list() -> str:
    """The supported model types and their classes, for messages: "gpt2 (GPT2LMHeadModel), ..."."""
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
        head_dim=head_dim,
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
    gpt2 = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, qkv_bias=True, n_kv_head=config.n_head,
                head_dim=config.d_model // config.n_head)
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


def to_hf_config(config: ModelConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
    """The config.json of the Hugging Face model that `config` is (see `hf_family`), with the tokenizer's
    begin and end token ids."""
    family = hf_family(config)
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}
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
# weight key tables


@dataclass(frozen=True)
class KeyTable:
    """How one family's Hugging Face weights make lmforge's (see the module docstring)."""

    keys: dict[str, tuple[str, ...]]  # ours -> theirs ("{}": the layer); several are stacked by rows, in order
    prefix: str  # the base model's prefix, which checkpoints of the bare model (GPT2Model, LlamaModel) lack
    transposed: frozenset[str] = field(default_factory=frozenset)  # ours that theirs store as (in, out)


def _gpt2_layer(ours: str, theirs: str) -> dict[str, tuple[str, ...]]:
    return {f"blocks.{{}}.{ours}.{p}": (f"transformer.h.{{}}.{theirs}.{p}",) for p in ("weight", "bias")}


GPT2 = KeyTable(
    keys={
        "tok_emb.weight": ("transformer.wte.weight",),
        "pos_emb.weight": ("transformer.wpe.weight",),
        **_gpt2_layer("norm1", "ln_1"),
        **_gpt2_layer("attn.qkv", "attn.c_attn"),
        **_gpt2_layer("attn.proj", "attn.c_proj"),
        **_gpt2_layer("norm2", "ln_2"),
        **_gpt2_layer("mlp.up", "mlp.c_fc"),
        **_gpt2_layer("mlp.down", "mlp.c_proj"),
        "norm.weight": ("transformer.ln_f.weight",),
        "norm.bias": ("transformer.ln_f.bias",),
        "head.weight": ("lm_head.weight",),
    },
    prefix="transformer.",
    transposed=frozenset(f"blocks.{{}}.{m}.weight" for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")),
)

LLAMA = KeyTable(
    keys={
        "tok_emb.weight": ("model.embed_tokens.weight",),
        "blocks.{}.norm1.weight": ("model.layers.{}.input_layernorm.weight",),
        "blocks.{}.attn.qkv.weight": tuple(f"model.layers.{{}}.self_attn.{x}_proj.weight" for x in "qkv"),
        "blocks.{}.attn.qkv.bias": tuple(f"model.layers.{{}}.self_attn.{x}_proj.bias" for x in "qkv"),  # Qwen2
        "blocks.{}.attn.proj.weight": ("model.layers.{}.self_attn.o_proj.weight",),
        "blocks.{}.norm2.weight": ("model.layers.{}.post_attention_layernorm.weight",),
        "blocks.{}.mlp.up.weight": ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
        "blocks.{}.mlp.down.weight": ("model.layers.{}.mlp.down_proj.weight",),
        "norm.weight": ("model.norm.weight",),
        "head.weight": ("lm_head.weight",),
    },
    prefix="model.",
)

KEY_TABLES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}
"""The key table of each supported Hugging Face model_type."""

_HF_ONLY_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # not weights: nothing to map
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def _fused_rows(config: ModelConfig) -> dict[str, list[int]]:
    """The rows each Hugging Face part takes in a stacked lmforge weight ([q; k; v], [gate; up])."""
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {"blocks.{}.attn.qkv.weight": [q, kv, kv], "blocks.{}.attn.qkv.bias": [q, kv, kv],
            "blocks.{}.mlp.up.weight": [config.d_ff, config.d_ff]}


def _theirs(table: KeyTable, ours: str) -> tuple[str, tuple[str, ...]]:
    """(the table's pattern for lmforge weight `ours`, the Hugging Face names it is made of)."""
    match = _LAYER.match(ours)
    pattern = _LAYER.sub("blocks.{}.", ours) if match else ours
    if pattern not in table.keys:
        raise UserError(f"lmforge weight {ours!r} has no Hugging Face name; expected one of the table's: "
                        f"{', '.join(table.keys)}")
    layer = match.group(1) if match else ""
    return pattern, tuple(name.format(layer) for name in table.keys[pattern])


def weight_names(config: ModelConfig) -> list[str]:
    """The names of the weights of a Decoder of `config`, in order (built on the meta device: no memory)."""
    with torch.device("meta"):
        return list(Decoder(config).state_dict())


def state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str
) -> dict[str, torch.Tensor]:
    """lmforge's state dict (fp32) from a Hugging Face one of `model_type` (see the module docstring)."""
    if model_type not in KEY_TABLES:
        raise UserError(f"model_type {model_type!r} is not supported; supported: {supported_list()}")
    table = KEY_TABLES[model_type]
    # checkpoints of the bare models (GPT2Model, LlamaModel) lack the base model's prefix
    src = {k if k.startswith((table.prefix, "lm_head.")) else table.prefix + k: v for k, v in hf_state.items()}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for ours in weight_names(config):
        pattern, theirs = _theirs(table, ours)
        for name in theirs:
            if name not in src:
                raise UserError(f"the checkpoint has no tensor {name!r}; it does not match its {model_type} "
                                "config.json")
        used.update(theirs)
        parts = [src[name].float() for name in theirs]  # fp32 sources: the same tensors, not copies
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        out[ours] = (tensor.T if pattern in table.transposed else tensor).contiguous()
    if config.tie_embeddings and "lm_head.weight" in src:
        used.add("lm_head.weight")  # a tied head saved anyway (transformers ties it to the embedding on load too)
    left = sorted(k for k in set(src) - used if not k.endswith(_HF_ONLY_BUFFERS))
    if left:
        raise UserError(f"the checkpoint has {len(left)} tensors this {model_type} config does not use, e.g. "
                        f"{', '.join(left[:3])}")
    return out


def state_dict_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict (of `hf_family(config)`) for lmforge's `state`; tied heads are left out."""
    table = KEY_TABLES[hf_family(config)]
    rows = _fused_rows(config)
    out: dict[str, torch.Tensor] = {}
    for ours, tensor in state.items():
        pattern, theirs = _theirs(table, ours)
        tensor = tensor.detach().to("cpu", torch.float32)
        tensor = tensor.T if pattern in table.transposed else tensor
        parts = tensor.split(rows[pattern]) if len(theirs) > 1 else (tensor,)
        out.update((name, part.contiguous()) for name, part in zip(theirs, parts, strict=True))
    return out
