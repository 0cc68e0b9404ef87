"""Tests of the encoder-decoder: the attention modes of the shared layers (bidirectional with padding masked,
causal, cross-attention), the KV cache with cached encoder keys/values, greedy / sampled / beam generation
(beam 1 = greedy, batched = one by one, beam search = exhaustive search when the beam holds everything),
the checkpoint round trip through `lmforge.load`, a tiny training whose loss goes down, and bad input."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import lmforge
from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import UserError
from lmforge.infer.beam import beam_search_ids
from lmforge.infer.generate import generate_ids
from lmforge.models import build_model
from lmforge.models.layers import Block, key_padding_mask
from lmforge.models.seq2seq import Seq2Seq, pad_right
from lmforge.recipes.seq2seq import train_seq2seq
from lmforge.tasks.seq2seq import predict
from lmforge.train.checkpoint import save_checkpoint

STYLES = {
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned", bias=True, n_head=2),
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, n_head=4, n_kv_head=2),
}


def seq2seq_config(style: str = "gpt2", **overrides) -> ModelConfig:
    values = dict(STYLES[style], kind="seq2seq", vocab_size=61, block_size=24, n_layer=2, n_encoder_layer=1,
                  d_model=32)
    return ModelConfig(**{**values, **overrides}).validate()


def make_seq2seq(style: str = "gpt2", seed: int = 0, **overrides) -> Seq2Seq:
    """A Seq2Seq with large random weights, so that its outputs depend clearly on its inputs."""
    torch.manual_seed(seed)
    model = build_model(seq2seq_config(style, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


def random_ids(batch: int, length: int, vocab: int = 61, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def sources_with_padding(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    rows = [random_ids(1, n, seed=seed + n)[0].tolist() for n in (6, 9, 3)]
    source, mask = pad_right(rows, pad_id=5)
    return source, mask, rows


# ----------------------------------------------------------------------------------------------
# the layers


def test_bidirectional_block_ignores_padding_and_sees_both_ways() -> None:
    torch.manual_seed(0)
    block = Block(seq2seq_config(), 0).eval()
    x = torch.randn(2, 8, 32)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 5:] = False
    changed = x.clone()
    changed[0, 5:] = torch.randn(3, 32)  # only padded positions of row 0 change
    a = block(x, mask=key_padding_mask(valid), causal=False)
    b = block(changed, mask=key_padding_mask(valid), causal=False)
    assert a.shape == (2, 8, 32)
    torch.testing.assert_close(a[0, :5], b[0, :5], atol=1e-6, rtol=0)  # real positions see no padding
    torch.testing.assert_close(a[1], b[1])
    later = x.clone()
    later[1, 7] = torch.randn(32)  # a change at the end is seen at the start: not causal
    c = block(later, causal=False)
    assert (c[1, 0] - block(x, causal=False)[1, 0]).abs().amax() > 1e-4
    causal = block(later)  # the default stays causal
    torch.testing.assert_close(causal[1, :7], block(x)[1, :7], atol=1e-6, rtol=0)


def test_cross_attention_block_shapes_and_memory_padding() -> None:
    torch.manual_seed(0)
    block = Block(seq2seq_config("llama"), 0, cross_attention=True).eval()
    names = {n for n, _ in block.named_parameters()}
    assert {"cross_attn.q.weight", "cross_attn.kv.weight", "cross_attn.proj.weight", "norm_cross.weight"} <= names
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False
    y = block(x, memory=memory, memory_mask=key_padding_mask(valid))
    assert y.shape == (2, 5, 32)
    changed = memory.clone()
    changed[1, 4:] = torch.randn(3, 32)
    torch.testing.assert_close(y, block(x, memory=changed, memory_mask=key_padding_mask(valid)))
    changed[1, 0] = torch.randn(32)  # a real memory position does matter
    assert (y[1] - block(x, memory=changed, memory_mask=key_padding_mask(valid))[1]).abs().amax() > 1e-4


# ----------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("style", sorted(STYLES))
def test_decoder_is_causal_and_source_padding_is_invisible(style: str) -> None:
    model = make_seq2seq(style)
    source, mask, _ = sources_with_padding()
    ids = random_ids(3, 10, seed=7)
    logits = model(ids, source=source, source_mask=mask)
    assert logits.shape == (3, 10, 61)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 61
    other = model(changed, source=source, source_mask=mask)
    torch.testing.assert_close(logits[:, :6], other[:, :6], atol=1e-5, rtol=0)  # no attention to the future
    assert (logits[:, 6:] - other[:, 6:]).abs().amax() > 1e-3
    repadded = source.clone()
    repadded[~mask] = 11  # other pad ids
    torch.testing.assert_close(logits, model(ids, source=repadded, source_mask=mask), atol=1e-5, rtol=0)
    moved = source.clone()
    moved[0, 0] = (moved[0, 0] + 1) % 61  # the source is read
    assert (logits[0] - model(ids, source=moved, source_mask=mask)[0]).abs().amax() > 1e-3


@pytest.mark.parametrize("style", sorted(STYLES))
def test_cache_equals_recompute(style: str) -> None:
    model = make_seq2seq(style)
    source, mask, _ = sources_with_padding(seed=3)
    ids = random_ids(3, 12, seed=4)
    with torch.no_grad():
        full = model(ids, source=source, source_mask=mask)
        cache = model.new_cache(3)
        cache.condition = model.condition(source, mask)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert cache.length == 12 and set(cache.cross) == {0, 1}  # encoder keys/values made once per layer
    # one token at a time sums in another order than the whole sequence: equal up to rounding, which grows with
    # the logits (here <= 20 ulps of the largest; 256 allowed; a caching mistake moves them by a good part of it)
    ulps = 256 * torch.finfo(full.dtype).eps * full.abs().max().item()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=ulps)


def test_separate_embeddings_and_parameter_count() -> None:
    shared, separate = make_seq2seq(), make_seq2seq(share_embeddings=False)
    assert shared.src_emb is None and separate.src_emb is not None
    assert separate.num_parameters() - shared.num_parameters() == 61 * 32
    assert shared.num_parameters(exclude_embeddings=True) == separate.num_parameters(exclude_embeddings=True)


# ----------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("style", sorted(STYLES))
def test_beam_one_is_greedy_and_batched_equals_one_by_one(style: str) -> None:
    model = make_seq2seq(style)
    source, mask, rows = sources_with_padding(seed=5)
    eos = 3
    prompts = [[eos]] * 3
    condition = model.condition(source, mask)
    greedy = generate_ids(model, prompts, 12, temperature=0, eos_id=eos, condition=condition)
    assert beam_search_ids(model, prompts, 1, 12, eos_id=eos, condition=condition) == greedy
    assert len({tuple(g) for g in greedy}) == 3  # the outputs differ by source: a meaningful comparison
    beams = beam_search_ids(model, prompts, 4, 12, length_penalty=0.7, eos_id=eos, condition=condition)
    for i, row in enumerate(rows):
        alone = model.condition(torch.tensor([row]))
        assert generate_ids(model, [[eos]], 12, temperature=0, eos_id=eos, condition=alone) == [greedy[i]]
        assert beam_search_ids(model, [[eos]], 4, 12, length_penalty=0.7, eos_id=eos, condition=alone) == [beams[i]]
    sampled = generate_ids(model, prompts, 12, temperature=1.0, top_k=10, eos_id=eos, seed=1, condition=condition)
    assert sampled == generate_ids(model, prompts, 12, temperature=1.0, top_k=10, eos_id=eos, seed=1,
                                   condition=condition)


def sequence_score(model: Seq2Seq, source: torch.Tensor, tokens: list[int], eos: int, penalty: float) -> float:
    """Summed log-probability of `tokens` after the start token, divided by length ** penalty."""
    ids = torch.tensor([[eos] + tokens[:-1]])
    logp = model(ids, source=source).log_softmax(-1)[0]
    total = sum(logp[i, t].item() for i, t in enumerate(tokens))
    return total / len(tokens) ** penalty


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_beam_search_equals_exhaustive_search_with_a_wide_beam(penalty: float) -> None:
    vocab, eos, steps = 5, 0, 3
    model = make_seq2seq(vocab_size=vocab, seed=2)
    source = random_ids(1, 4, vocab=vocab, seed=9)
    # every output of at most 3 tokens: ended by eos, or cut at 3 tokens
    candidates = [list(c) + [eos] for n in range(steps) for c in itertools.product(range(1, vocab), repeat=n)]
    candidates += [list(c) for c in itertools.product(range(1, vocab), repeat=steps)]
    with torch.no_grad():
        scored = [(sequence_score(model, source, c, eos, penalty), c) for c in candidates]
    best = max(scored)[1]
    expected = best[:-1] if best[-1] == eos else best
    found = beam_search_ids(model, [[eos]], beam_size=vocab**steps, max_new_tokens=steps, length_penalty=penalty,
                            early_stopping=False, eos_id=eos, condition=model.condition(source))
    assert found == [expected]


# ----------------------------------------------------------------------------------------------
# training, checkpoints, prediction

WORDS = "red green blue black white gold grey pink".split()


def reverse_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Sources of 2-4 colour words; the target is the same words in reverse order."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        k = int(torch.randint(2, 5, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)]
        pairs.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    return pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("s2s") / "run"
    config = seq2seq_config(block_size=32, d_model=48, n_head=2)
    train_config = TrainConfig(batch_size=16, max_steps=60, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                               eval_interval=30, log_interval=10, precision="fp32", keep_best=True)
    summary = train_seq2seq(reverse_pairs(200, 0), reverse_pairs(24, 1), tokenizer, config, out, train_config)
    return out, summary


def test_training_lowers_the_loss_and_writes_the_run(trained) -> None:
    out, summary = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(evals) == 2 and summary["val_loss"] == evals[-1]
    assert losses[-1] < 0.6 * losses[0]
    assert evals[-1] < math.log(384) / 2  # far below a uniform guess over the vocabulary
    for name in ("loss.png", "run.yaml", "summary.json", "checkpoint/model.safetensors", "best/config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "checkpoint/config.json").read_text())["kind"] == "seq2seq"


def test_load_round_trip_and_predict(trained, tmp_path) -> None:
    out, _ = trained
    model = lmforge.load(out / "checkpoint")
    assert isinstance(model, Seq2Seq) and model.tokenizer is not None
    sources = ["red blue", "gold grey pink black", "white green"]
    greedy = predict(model, sources, max_new_tokens=12)
    assert greedy == predict(model, sources, beam_size=1, max_new_tokens=12)
    assert len(predict(model, sources, beam_size=3, max_new_tokens=12)) == 3
    assert all(isinstance(t, str) and t for t in greedy)
    again = tmp_path / "copy"
    save_checkpoint(again, model)
    reloaded = lmforge.load(again)
    source, mask = pad_right([model.tokenizer.encode(s) for s in sources], model.tokenizer.eos_id)
    ids = random_ids(3, 6, vocab=model.config.vocab_size, seed=1)
    torch.testing.assert_close(model(ids, source=source, source_mask=mask),
                               reloaded(ids, source=source, source_mask=mask), atol=0, rtol=0)
    assert predict(reloaded, sources, max_new_tokens=12) == greedy


def test_bad_input(trained, tokenizer, tmp_path, capsys) -> None:
    out, _ = trained
    model = lmforge.load(out / "checkpoint")
    with pytest.raises(UserError, match="beam-size = 0; expected >= 1"):
        predict(model, ["red"], beam_size=0)
    with pytest.raises(UserError, match="source 2 is empty"):
        predict(model, ["red", "  "])
    long_source = " ".join(WORDS * 10)
    with pytest.raises(UserError, match="tokens; the model's limit here is 32"):
        predict(model, [long_source], too_long="error")
    assert len(predict(model, [long_source], max_new_tokens=4)) == 1
    assert "longer than 32 tokens and were cut" in capsys.readouterr().err
    config = seq2seq_config(block_size=32)
    train_config = TrainConfig(max_steps=1)
    with pytest.raises(UserError, match="target 2 is empty"):
        train_seq2seq([{"source": "a", "target": "b"}, {"source": "c", "target": ""}], reverse_pairs(2, 0),
                      tokenizer, config, tmp_path / "x", train_config)
    with pytest.raises(UserError, match="item 1 is not a"):
        train_seq2seq([{"src": "a"}], reverse_pairs(2, 0), tokenizer, config, tmp_path / "y", train_config)
    with pytest.raises(UserError, match="already exists"):
        train_seq2seq(reverse_pairs(2, 0), reverse_pairs(2, 0), tokenizer, config, out, train_config)
    with pytest.raises(UserError, match="expected one of decoder, seq2seq, vae"):
        ModelConfig(kind="gan").validate()


def test_preset_name_epochs_and_overrides(tokenizer, tmp_path) -> None:
    """The way the task verbs call it: a preset name, epochs, a context length and --model/--train flags."""
    out = tmp_path / "run"
    summary = train_seq2seq(reverse_pairs(40, 2), reverse_pairs(4, 3), tokenizer, "tiny", out, epochs=2,
                            max_length=20, overrides={"model.n_layer": 1, "model.d_model": 32, "train.batch_size": 8})
    assert summary["step"] == 2 * (40 // 8)
    config = json.loads((out / "checkpoint/config.json").read_text())
    assert config["kind"] == "seq2seq" and config["block_size"] == 20 and config["n_layer"] == 1
    assert config["vocab_size"] == tokenizer.vocab_size
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in line]
    assert epochs == [1.0, 2.0]
    with pytest.raises(UserError, match="unknown setting 'lr'"):
        train_seq2seq(reverse_pairs(4, 2), reverse_pairs(2, 3), tokenizer, "tiny", tmp_path / "z", overrides={"lr": 1})


def test_generate_verb_runs_a_seq2seq_checkpoint(trained, capsys) -> None:
    from lmforge.cli import main

    out, _ = trained
    expected = predict(lmforge.load(out / "checkpoint"), ["red blue"], max_new_tokens=8)[0]
    assert main(["generate", str(out / "checkpoint"), "--prompt", "red blue", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == f"red blue{expected}\n"
    model = lmforge.load(out / "checkpoint")
    two = model.generate("red blue", max_new_tokens=8, temperature=1.0, num_samples=2, seed=3, stop=["gold"])
    assert len(two) == 2 and not any("gold" in t for t in two)


def test_api_generate_runs_a_seq2seq_model_and_z_seed_needs_a_cvae(tokenizer) -> None:
    model = make_seq2seq(vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    expected = model.generate(["red blue", "gold"], max_new_tokens=6)
    assert lmforge.generate(model, ["red blue", "gold"], max_new_tokens=6) == expected
    with pytest.raises(UserError, match=r"^z_seed needs a conditional VAE \(kind cvae\); this model is kind seq2seq$"):
        predict(model, ["red blue"], max_new_tokens=4, z_seed=1)


def test_generate_streams_like_the_decoder(tokenizer) -> None:
    """Seq2Seq.generate is the decoder's generate with a condition: the same streaming rule, beams included."""
    model = make_seq2seq(vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    pieces: list[str] = []
    text = model.generate("red blue", max_new_tokens=8, stream=pieces.append)[0]
    assert "".join(pieces) == text
    with pytest.raises(UserError, match="streaming shows one sample"):
        model.generate(["red", "blue"], max_new_tokens=4, stream=pieces.append, batch_size=1)
    beams: list[str] = []
    best = model.generate("red blue", max_new_tokens=8, beam_size=3, stream=beams.append)[0]
    assert beams == [best]
    source, mask = pad_right([tokenizer.encode("red blue")], tokenizer.eos_id)
    eos = tokenizer.eos_id
    assert best == tokenizer.decode(beam_search_ids(model, [[eos]], 3, 8, eos_id=eos,
                                                    condition=model.condition(source, mask))[0])
