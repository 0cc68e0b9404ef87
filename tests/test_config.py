"""Tests of lmforge.config: presets, parameter counts against transformers, YAML in and out, and the
UserErrors for unknown keys, wrong types and impossible shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.config import (
    PRESET_NOTES,
    PRESETS,
    ModelConfig,
    TrainConfig,
    from_text,
    load_run_config,
    preset,
    save_yaml,
    to_dict,
)
from lmforge.errors import UserError
from lmforge.models.decoder import Decoder


def meta_decoder(config: ModelConfig) -> Decoder:
    with torch.device("meta"):  # shapes only: a 1B model costs nothing
        return Decoder(config)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_builds(name: str) -> None:
    config = preset(name)
    assert config.validate() is config
    assert name in PRESET_NOTES
    model = meta_decoder(config)
    n = model.num_parameters()
    body = model.num_parameters(exclude_embeddings=True)
    # count from the shapes: attention (grouped-query k/v), MLP (gate + up for swiglu), biases, norms
    d, kv, ff = config.d_model, config.n_kv_head * config.head_dim, config.d_ff
    up = (2 if config.mlp == "swiglu" else 1) * ff
    weights = d * (d + 2 * kv) + d * d + d * up + ff * d
    biases = ((d + 2 * kv) if config.qkv_bias else 0) + ((d + up + d) if config.bias else 0)
    norm = d * (2 if config.norm == "layernorm" and config.bias else 1)
    head = 0 if config.tie_embeddings else config.vocab_size * d
    assert body == config.n_layer * (weights + biases + 2 * norm) + norm + head
    embeddings = config.vocab_size * d + (config.block_size * d if config.position == "learned" else 0)
    assert n == body + embeddings


def test_gpt2_preset_has_the_gpt2_124m_parameter_count() -> None:
    assert meta_decoder(preset("gpt2")).num_parameters() == 124_439_808


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "smollm2-135m", "llama-1b"])
def test_preset_parameter_counts_match_transformers(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    c = preset(name)
    if c.position == "learned":
        hf_config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.d_model,
                                            n_layer=c.n_layer, n_head=c.n_head)
        cls = transformers.GPT2LMHeadModel
    else:
        hf_config = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, tie_word_embeddings=c.tie_embeddings,
            max_position_embeddings=c.block_size)
        cls = transformers.LlamaForCausalLM
    with torch.device("meta"):
        hf = cls(hf_config)
    assert meta_decoder(c).num_parameters() == sum(p.numel() for p in hf.parameters())


def test_defaults_fill_in() -> None:
    c = ModelConfig(d_model=384, n_head=6, mlp="swiglu")
    assert c.n_kv_head == 6 and c.qkv_bias is c.bias
    assert c.d_ff % 64 == 0 and c.d_ff >= 8 * 384 // 3 and c.d_ff - 64 < 8 * 384 // 3
    assert ModelConfig(d_model=100, mlp="gelu", n_head=4).d_ff == 400


def test_yaml_round_trip(tmp_path) -> None:
    model, train = load_run_config("llama-tiny", None, {"train.lr": 3e-3, "model.n_layer": 3, "train.max_minutes": 2})
    assert model.n_layer == 3 and model.n_kv_head == 2 and train.lr == 3e-3 and train.max_minutes == 2.0
    path = tmp_path / "run.yaml"
    save_yaml(path, model, train)
    model2, train2 = load_run_config(None, path)
    assert model2 == model and train2 == train
    assert to_dict(model2) == to_dict(model)


def test_merge_order_preset_then_file_then_flags(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmodel:\n  n_layer: 3\n  d_model: 96\ntrain:\n  lr: 0.002\n  batch_size: 4\n")
    model, train = load_run_config(None, path, {"model.n_layer": 5, "train.batch_size": 2})
    tiny = preset("tiny")
    assert (model.n_layer, model.d_model, model.vocab_size) == (5, 96, tiny.vocab_size)
    assert (train.lr, train.batch_size, train.warmup_steps) == (0.002, 2, TrainConfig().warmup_steps)
    # a preset named by the caller wins over the file's
    model, _ = load_run_config("llama-tiny", path)
    assert model.norm == "rmsnorm" and model.n_layer == 3


def test_exponent_floats_in_yaml_and_flags(tmp_path) -> None:
    """`lr: 3e-4` is how everyone writes a learning rate (PyYAML reads it as a string)."""
    assert from_text("3e-4", float, "train.lr", none_word=True) == pytest.approx(3e-4)
    assert from_text("0.0003", float, "train.lr", none_word=True) == pytest.approx(3e-4)
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 3e-4\n  min_lr: 1e-5\n")
    _, train = load_run_config("tiny", path)
    assert train.lr == pytest.approx(3e-4) and train.min_lr == pytest.approx(1e-5)


def test_flag_values_take_the_field_type() -> None:
    assert from_text("12", int, "model.n_layer", none_word=True) == 12
    assert from_text("2", float, "train.lr", none_word=True) == 2.0
    assert from_text("true", bool, "train.compile", none_word=True) is True
    assert from_text("32", str, "train.precision", none_word=True) == "32"  # digits for a string field stay a string
    assert from_text("null", int | None, "model.n_kv_head", none_word=True) is None
    with pytest.raises(UserError, match="model.n_layer"):
        from_text("two", int, "model.n_layer", none_word=True)


@pytest.mark.parametrize("key, close", [("train.lrr", "lr"), ("model.n_layers", "n_layer"),
                                        ("train.warmup", "warmup_steps"), ("model.dmodel", "d_model")])
def test_unknown_key_names_it_and_suggests_the_close_one(key: str, close: str) -> None:
    with pytest.raises(UserError) as e:
        load_run_config("tiny", None, {key: 1})
    assert key in str(e.value) and repr(close) in str(e.value)


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  zzzzqqq: 1\n")
    with pytest.raises(UserError) as e:
        load_run_config("tiny", path)
    message = str(e.value)
    assert "model.zzzzqqq" in message
    assert all(f.name in message for f in dataclasses.fields(ModelConfig))


@pytest.mark.parametrize("key, value", [
    ("train.lr", "fast"),
    ("model.n_layer", 2.5),
    ("model.n_layer", True),  # a bool is not an int
    ("train.batch_size", "8"),
    ("train.compile", "yes"),
    ("model.bias", 1),
    ("model.norm", 3),
    ("train.max_minutes", [1]),
])
def test_wrong_type_names_the_field(key: str, value) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.") + " = "):
        load_run_config("tiny", None, {key: value})


def test_wrong_type_in_yaml_names_the_field(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  n_layer: 2.5\n")
    with pytest.raises(UserError, match=r"model\.n_layer"):
        load_run_config("tiny", path)


def test_unknown_preset_lists_the_presets(tmp_path) -> None:
    for call in (lambda: preset("gpt5"), lambda: load_run_config("gpt5")):
        with pytest.raises(UserError) as e:
            call()
        assert "'gpt5'" in str(e.value)
        assert all(name in str(e.value) for name in PRESETS)
    path = tmp_path / "run.yaml"
    path.write_text("preset: gpt5\n")
    with pytest.raises(UserError, match="gpt5"):
        load_run_config(None, path)


@pytest.mark.parametrize("overrides, field", [
    ({"model.d_model": 100, "model.n_head": 3}, "model.d_model"),
    ({"model.n_head": 4, "model.n_kv_head": 3}, "model.n_kv_head"),
    ({"model.n_layer": 0}, "model.n_layer"),
    ({"model.norm": "batchnorm"}, "model.norm"),
    ({"model.mlp": "relu"}, "model.mlp"),
    ({"model.position": "alibi"}, "model.position"),
    ({"model.dropout": 1.0}, "model.dropout"),
    ({"model.position": "rope", "model.d_model": 60, "model.n_head": 4}, "rope"),  # head size 15
    ({"train.batch_size": 6, "train.grad_accum": 4}, "train.grad_accum"),
    ({"train.precision": "fp8"}, "train.precision"),
    ({"train.lr": 1e-4, "train.min_lr": 1e-3}, "train.min_lr"),
    ({"train.lr": 0.0, "train.min_lr": 0.0}, "train.lr"),
    ({"train.warmup_steps": -1}, "train.warmup_steps"),
    ({"train.max_steps": 0}, "train.max_steps"),
    ({"train.max_minutes": 0}, "train.max_minutes"),
    ({"train.lr": float("nan")}, "train.lr"),
    ({"train.lr": float("inf"), "train.min_lr": 0.0}, "train.lr"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_invalid_combinations(overrides: dict, field: str) -> None:
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_run_config("tiny", None, overrides)


def test_bad_config_files(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_run_config(None, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_run_config(None, bad)
    bad.write_text("modle:\n  n_layer: 2\n")
    with pytest.raises(UserError, match="modle"):
        load_run_config(None, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_run_config(None, bad)
    with pytest.raises(UserError, match="nolayer"):
        load_run_config("tiny", None, {"nolayer": 2})
