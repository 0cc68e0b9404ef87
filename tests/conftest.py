"""Shared fixtures: a tiny tokenizer and token shards made from a few KB of text, tiny model configs,
and random-weight Hugging Face models with lmforge copies of their weights (for parity tests).

Everything is made by the tests in seconds; nothing is downloaded. `LMFORGE_CACHE` points at a
temporary directory for the whole session, so the measured matmul peak (used for MFU) never
touches ~/.cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data import Document, prepare
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer, train_tokenizer

SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


def corpus_documents(n: int = 8) -> list[Document]:
    """About 5 KB of English: the sonnet, its lines rotated differently in each document."""
    lines = SONNET.splitlines(keepends=True)
    return [Document(f"sonnet{i}", f"SONNET {i}\n" + "".join(lines[i:] + lines[:i])) for i in range(n)]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' models are tiny: a second thread only adds synchronisation, and on a busy machine
    OpenMP's spin-waits make steps 10x slower. Subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def lmforge_cache(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide LMFORGE_CACHE (inherited by subprocesses the tests start)."""
    path = tmp_path_factory.mktemp("lmforge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer trained on English only: Chinese text stays split into single bytes."""
    return train_tokenizer([d.text for d in corpus_documents()], vocab_size=384, show_progress=False)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """Token shards (train.bin, val.bin, meta.json, tokenizer.json) of the corpus."""
    out = tmp_path_factory.mktemp("shards") / "data"
    prepare(corpus_documents(), tokenizer, out, val_fraction=0.2, show_progress=False)
    return out


def tiny_config(style: str = "gpt2", vocab_size: int = 384, **overrides) -> ModelConfig:
    """A GPT-2 style or Llama style (grouped-query: 4 query heads, 2 key/value heads) toy config."""
    if style == "gpt2":
        base = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, n_head=2)
    elif style == "llama":
        base = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, n_head=4, n_kv_head=2)
    else:
        raise ValueError(style)
    values = dict(base, vocab_size=vocab_size, block_size=32, n_layer=2, d_model=32)
    return ModelConfig(**{**values, **overrides}).validate()


@pytest.fixture(scope="session")
def make_config():
    return tiny_config


@pytest.fixture(scope="session")
def make_model():
    """`make_model(style, seed=0, **config_overrides)`: a fresh fp32 Decoder in eval mode."""

    def make(style: str = "gpt2", seed: int = 0, **overrides) -> Decoder:
        torch.manual_seed(seed)
        return Decoder(tiny_config(style, **overrides)).eval()

    return make


# ----------------------------------------------------------------------------------------------
# Hugging Face models with random weights, and lmforge Decoders holding the same weights

PARITY_VOCAB = 97  # odd on purpose: nothing may assume a round vocabulary


def _perturb_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm gains and biases start at 1 and 0; make them random so a swapped mapping shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") and ("ln" in name or "norm" in name) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=generator))


def gpt2_to_lmforge(hf) -> Decoder:
    """An lmforge Decoder with the weights of a transformers GPT2LMHeadModel (explicit mapping)."""
    c = hf.config
    config = ModelConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                         d_model=c.n_embd, d_ff=4 * c.n_embd, norm="layernorm", mlp="gelu", position="learned",
                         bias=True, tie_embeddings=True, norm_eps=c.layer_norm_epsilon)
    model = Decoder(config)
    src = hf.state_dict()
    state = {"tok_emb.weight": src["transformer.wte.weight"], "pos_emb.weight": src["transformer.wpe.weight"],
             "norm.weight": src["transformer.ln_f.weight"], "norm.bias": src["transformer.ln_f.bias"]}
    for i in range(c.n_layer):
        h = f"transformer.h.{i}."
        b = f"blocks.{i}."
        # GPT-2's Conv1D stores weights as (in, out); nn.Linear as (out, in)
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            state[b + ours + ".weight"] = src[h + theirs + ".weight"].T
            state[b + ours + ".bias"] = src[h + theirs + ".bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            state[b + ours + ".weight"] = src[h + theirs + ".weight"]
            state[b + ours + ".bias"] = src[h + theirs + ".bias"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def llama_to_lmforge(hf) -> Decoder:
    """An lmforge Decoder with the weights of a transformers LlamaForCausalLM (explicit mapping)."""
    c = hf.config
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or c.rope_theta
    config = ModelConfig(vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers,
                         n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, d_model=c.hidden_size,
                         d_ff=c.intermediate_size, norm="rmsnorm", mlp="swiglu", position="rope", rope_theta=theta,
                         bias=False, tie_embeddings=c.tie_word_embeddings, norm_eps=c.rms_norm_eps)
    model = Decoder(config)
    src = hf.state_dict()
    state = {"tok_emb.weight": src["model.embed_tokens.weight"], "norm.weight": src["model.norm.weight"]}
    for i in range(c.num_hidden_layers):
        h = f"model.layers.{i}."
        b = f"blocks.{i}."
        state[b + "attn.qkv.weight"] = torch.cat([src[h + f"self_attn.{x}_proj.weight"] for x in "qkv"], dim=0)
        state[b + "attn.proj.weight"] = src[h + "self_attn.o_proj.weight"]
        state[b + "mlp.up.weight"] = torch.cat([src[h + "mlp.gate_proj.weight"], src[h + "mlp.up_proj.weight"]], dim=0)
        state[b + "mlp.down.weight"] = src[h + "mlp.down_proj.weight"]
        state[b + "norm1.weight"] = src[h + "input_layernorm.weight"]
        state[b + "norm2.weight"] = src[h + "post_attention_layernorm.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def gpt2_pair():
    """(transformers GPT2LMHeadModel with random weights, the lmforge Decoder with the same weights)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=PARITY_VOCAB, n_positions=48, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, activation_function="gelu_new", initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    _perturb_norms(hf, torch.Generator().manual_seed(2))
    return hf, gpt2_to_lmforge(hf)


@pytest.fixture(scope="session")
def llama_pair():
    """(transformers LlamaForCausalLM with random weights, the lmforge Decoder with the same weights)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        vocab_size=PARITY_VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=176,
        num_hidden_layers=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    _perturb_norms(hf, torch.Generator().manual_seed(4))
    return hf, llama_to_lmforge(hf)
