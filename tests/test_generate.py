"""Tests of lmforge.infer.generate: greedy decoding against full recomputation and against
transformers, the sliding window, sampling options, stop strings, streaming and end-of-text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.errors import UserError
from lmforge.infer.generate import apply_repetition_penalty, generate, generate_ids, sample_next
from lmforge.models.decoder import Decoder
from lmforge.train.objectives import RandomWindows
from lmforge.train.trainer import Trainer

POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The argmax loop without a cache: the whole sequence through the model at every step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def lively_model(make_model):
    """`lively_model(style)`: a random model whose greedy output does not just repeat one token (an
    untied head, so a token's own embedding does not win, and weights 3x the usual init)."""

    def make(style: str, **overrides) -> Decoder:
        model = make_model(style, tie_embeddings=False, **overrides)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(3.0)
        return model

    return make


@pytest.fixture(scope="module")
def poem_model(tokenizer, make_config, tmp_path_factory):
    """A Llama-style toy trained (by the real Trainer) to recite a Chinese poem. The tokenizer was
    trained on English only, so every Chinese character is three byte-level tokens."""
    ids = tokenizer.encode(POEM)
    assert len(ids) == len(POEM.encode("utf-8"))  # one token per byte: characters split over tokens
    tokens = np.array((ids + [tokenizer.eos_id]) * 40)
    torch.manual_seed(0)
    model = Decoder(make_config("llama", vocab_size=tokenizer.vocab_size, d_model=64, block_size=48))
    config = TrainConfig(batch_size=8, max_steps=120, lr=1e-2, min_lr=1e-3, warmup_steps=5, precision="fp32",
                         eval_interval=1000, log_interval=20, weight_decay=0.0)
    out = tmp_path_factory.mktemp("poem")
    Trainer(model, config, out, RandomWindows(tokens, 48, 8, seed=0), tokenizer=tokenizer).fit()
    model.tokenizer = tokenizer
    return model.eval()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_greedy_with_cache_equals_recompute(lively_model, style: str) -> None:
    model = lively_model(style)
    prompts = random_prompts([3, 9, 1, 6], 384)
    got = generate_ids(model, prompts, max_new_tokens=12, temperature=0)
    assert got == [greedy_by_recompute(model, p, 12) for p in prompts]


def test_greedy_equals_transformers_generate(gpt2_pair) -> None:
    hf, ours = gpt2_pair
    prompts = random_prompts([4, 10, 7], hf.config.vocab_size, seed=1)
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0)
    assert generate_ids(ours, prompts, max_new_tokens=20, temperature=0) == expected[:, longest:].tolist()


def test_greedy_with_repetition_penalty_equals_transformers(gpt2_pair) -> None:
    hf, ours = gpt2_pair
    prompt = random_prompts([6], hf.config.vocab_size, seed=2)
    with torch.no_grad():
        expected = hf.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=25, repetition_penalty=1.5,
                               pad_token_id=0)
    plain = generate_ids(ours, prompt, max_new_tokens=25, temperature=0)
    got = generate_ids(ours, prompt, max_new_tokens=25, temperature=0, repetition_penalty=1.5)
    assert got == expected[:, 6:].tolist()
    assert got != plain  # the penalty changed something


def test_repetition_penalty_matches_transformers_processor() -> None:
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    seen = torch.randint(0, 50, (4, 30), generator=g)  # with repeats
    for penalty in (1.3, 0.7):
        expected = logits_process.RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits.clone(), seen, penalty), expected, rtol=0, atol=0)


def test_repetition_penalty_ignores_left_padding(make_model) -> None:
    """A prompt padded inside a batch continues as it does alone: the filler ids are not text it has seen."""
    model = make_model("gpt2", vocab_size=16)
    candidates = random_prompts([3] * 20, 16, seed=3)
    alone = {i: generate_ids(model, [p], 12, temperature=0, repetition_penalty=100.0)[0]
             for i, p in enumerate(candidates)}
    picked = [i for i, out in alone.items() if 0 in out]  # rows that choose id 0, the padding filler
    assert picked, "no candidate prompt generates id 0; pick other seeds"
    long_prompt = random_prompts([9], 16, seed=4)[0]
    batch = generate_ids(model, [candidates[picked[0]], long_prompt], 12, temperature=0, repetition_penalty=100.0)
    assert batch[0] == alone[picked[0]]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_sliding_window_follows_the_documented_rule(lively_model, style: str) -> None:
    """Past the context, the cache is rebuilt from the last half of the context: each token is the
    argmax over the current window, recomputed from scratch for each row alone."""
    model = lively_model(style)
    block, keep = model.config.block_size, model.config.block_size // 2
    prompts = random_prompts([5, 12], 384, seed=5)
    n = 3 * block
    got = generate_ids(model, prompts, max_new_tokens=n, temperature=0)
    assert [len(r) for r in got] == [n, n]

    longest = max(map(len, prompts))
    padded = [[None] * (longest - len(p)) + p for p in prompts]
    start, expected = 0, [[] for _ in prompts]
    with torch.no_grad():
        for i in range(n):
            if longest + i - start > block:
                start = longest + i - keep
            for r, row in enumerate(padded):
                context = [t for t in (row + expected[r])[start:] if t is not None]
                expected[r].append(int(model(torch.tensor([context]))[0, -1].argmax()))
    assert start > 0  # the window did slide
    assert got == expected
    assert len(set(got[1])) > 10  # a lively model: different windows give different tokens


def test_sliding_window_agrees_with_a_longer_context_until_it_slides(lively_model) -> None:
    model = lively_model("gpt2")
    long = Decoder(type(model.config)(**{**vars(model.config), "block_size": 128})).eval()
    state = model.state_dict()
    # the same weights; positions past the short context get the long model's own embeddings
    state["pos_emb.weight"] = torch.cat([state["pos_emb.weight"], long.pos_emb.weight[model.config.block_size:]])
    long.load_state_dict(state)
    prompt = random_prompts([10], 384, seed=6)
    n = 40
    short_run = generate_ids(model, prompt, max_new_tokens=n, temperature=0)[0]
    long_run = generate_ids(long, prompt, max_new_tokens=n, temperature=0)[0]
    fits = model.config.block_size - len(prompt[0]) + 1  # tokens predicted from the whole sequence
    assert len(short_run) == len(long_run) == n
    assert short_run[:fits] == long_run[:fits]
    assert len(set(short_run[:fits])) > 5  # not a model stuck repeating one token


def test_seed_reproducibility(make_model) -> None:
    model = make_model("llama")
    prompts = random_prompts([4, 7], 384, seed=7)
    a = generate_ids(model, prompts, 30, temperature=1.0, seed=0)
    b = generate_ids(model, prompts, 30, temperature=1.0, seed=0)
    c = generate_ids(model, prompts, 30, temperature=1.0, seed=1)
    assert a == b
    assert a != c
    assert a != generate_ids(model, prompts, 30, temperature=0)


def test_top_k_1_and_tiny_top_p_are_greedy(make_model) -> None:
    model = make_model("gpt2")
    prompts = random_prompts([4, 7, 2], 384, seed=8)
    greedy = generate_ids(model, prompts, 20, temperature=0)
    assert generate_ids(model, prompts, 20, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate_ids(model, prompts, 20, temperature=1.5, top_p=1e-6, seed=0) == greedy


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.6), (8, 0.7), (None, None)])
def test_sampling_distribution_matches_transformers_warpers(top_k, top_p) -> None:
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 20, generator=g) * 2
    temperature = 0.8
    scores = logits / temperature
    if top_k is not None:
        scores = logits_process.TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
    expected = scores.softmax(-1)[0]
    draws = sample_next(logits.expand(20000, 20), temperature, top_k, top_p, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(draws, minlength=20).float() / len(draws)
    assert set(draws.tolist()) == set(torch.nonzero(expected > 0).flatten().tolist())
    assert (frequencies - expected).abs().max() < 0.015


def test_stop_strings_cut_the_text(poem_model, tokenizer) -> None:
    full = generate(poem_model, "床前明月", max_new_tokens=40, temperature=0)[0]
    assert len(full) >= 8, full
    stop = full[4:6]
    assert generate(poem_model, "床前明月", max_new_tokens=40, temperature=0, stop=[stop])[0] == full[:full.index(stop)]
    # the earliest of several stop strings wins; an absent one changes nothing
    both = generate(poem_model, "床前明月", max_new_tokens=40, temperature=0, stop=["never there", full[6:8], stop])
    assert both == [full[:full.index(stop)]]
    assert generate(poem_model, "床前明月", max_new_tokens=40, temperature=0, stop=["never there"]) == [full]


class CountingModel:
    """The real model, with a count of its forward passes: generate takes any model with the protocol of
    lmforge.infer (this one is not even an nn.Module, so kernels leave it alone)."""

    def __init__(self, model: Decoder) -> None:
        self.model, self.config, self.tokenizer, self.calls = model, model.config, model.tokenizer, 0

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_stop_strings_end_generation_early(poem_model) -> None:
    counting = CountingModel(poem_model)
    full = generate(counting, "床前明月", max_new_tokens=40, temperature=0)[0]
    without_stop, counting.calls = counting.calls, 0
    stop = full[2:4]
    assert generate(counting, "床前明月", max_new_tokens=40, temperature=0, stop=[stop]) == [full[:2]]
    # one byte-level token per byte: the stop is complete after the bytes of full[:4]
    assert counting.calls == len(full[:4].encode("utf-8")) < without_stop


def test_streaming_pieces_concatenate_to_the_text(poem_model, tokenizer) -> None:
    pieces: list[str] = []
    text = generate(poem_model, "床前明月", max_new_tokens=45, temperature=0, stream=pieces.append)[0]
    assert "".join(pieces) == text
    chinese = [ch for ch in text if "\u4e00" <= ch <= "\u9fff"]
    assert len(chinese) >= 5, text  # characters made of several tokens were streamed
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)  # never a half character shown
    assert sum(1 for p in pieces if p) > 5  # shown as it goes, not all at the end


def test_streaming_with_a_stop_string_never_shows_the_stop(poem_model) -> None:
    full = generate(poem_model, "床前明月", max_new_tokens=40, temperature=0)[0]
    stop = full[5:8]
    pieces: list[str] = []
    text = generate(poem_model, "床前明月", max_new_tokens=40, temperature=0, stop=[stop], stream=pieces.append)[0]
    assert text == full[:full.index(stop)]
    assert "".join(pieces) == text


def test_streaming_a_random_model_with_broken_characters(make_model, tokenizer) -> None:
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size)
    pieces: list[str] = []
    text = generate(model, "月光", max_new_tokens=40, temperature=1.0, seed=3, stream=pieces.append,
                    tokenizer=tokenizer)[0]
    assert "".join(pieces) == text


def test_eos_stops_a_row(make_model) -> None:
    model = make_model("gpt2", vocab_size=50)
    prompts = random_prompts([3, 6, 4], 50, seed=9)
    free = generate_ids(model, prompts, 20, temperature=0)
    eos = free[0][3]
    calls = []
    got = generate_ids(model, prompts, 20, temperature=0, eos_id=eos, on_tokens=calls.append)
    for row_free, row in zip(free, got):
        assert row == (row_free[:row_free.index(eos)] if eos in row_free else row_free)
    ended = [r.index(eos) if eos in r else 20 for r in free]
    assert len(calls) == min(20, max(ended) + 1)  # the batch stops once every row has ended
    for step, ids in enumerate(calls):  # finished rows keep receiving eos
        for r in range(len(prompts)):
            if step >= ended[r]:
                assert int(ids[r]) == eos


def test_unconditional_samples_and_num_samples(make_model, tokenizer) -> None:
    model = make_model("llama", vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    texts = generate(model, "", max_new_tokens=10, temperature=1.0, num_samples=3, seed=0)
    assert len(texts) == 3 and len(set(texts)) > 1
    texts = generate(model, ["a", "b"], max_new_tokens=5, temperature=0, num_samples=2)
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3]


def test_errors(make_model, tokenizer) -> None:
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size)
    block = model.config.block_size
    with pytest.raises(UserError, match="context"):
        generate_ids(model, [[1] * block], 5)  # no room left to generate
    with pytest.raises(UserError, match="context"):
        generate(model, "thee " * 3 * block, 5, tokenizer=tokenizer)
    assert len(generate_ids(model, [[1] * (block - 1)], 5, temperature=0)[0]) == 5
    with pytest.raises(UserError, match="empty prompt"):
        generate_ids(model, [[1, 2], []], 5)
    with pytest.raises(UserError, match="tokenizer"):
        generate(model, "hello", 5)
    with pytest.raises(UserError, match="num-samples"):
        generate(model, ["a", "b"], 5, stream=lambda piece: None, tokenizer=tokenizer)
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0),
                dict(max_new_tokens=-1)):
        with pytest.raises(UserError):
            generate_ids(model, [[1, 2]], **{"max_new_tokens": 5, **bad})
    assert generate_ids(model, [[1, 2]], max_new_tokens=0) == [[]]


def test_batch_size_gives_the_same_texts_in_the_same_order(make_model, tokenizer) -> None:
    """`batch_size` splits the prompts into batches; greedy texts do not depend on it (the one output
    convention: prompt-major, one text per prompt and sample)."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    prompts = ["Shall I", "compare thee to a", "summer's"]
    whole = generate(model, prompts, max_new_tokens=6, temperature=0, num_samples=2)
    assert len(whole) == 6 and whole[0] == whole[1] and whole[4] == whole[5]
    for batch_size in (1, 4):
        assert generate(model, prompts, max_new_tokens=6, temperature=0, num_samples=2, batch_size=batch_size) == whole
    with pytest.raises(UserError, match="too_long: not an option"):
        generate(model, prompts, too_long="error")
    with pytest.raises(UserError, match="beam-size = 0"):
        generate(model, prompts, beam_size=0)


def test_the_generate_loop_does_not_import_the_models() -> None:
    """lmforge.infer sits below lmforge.models: a fresh interpreter importing it loads no model module."""
    import subprocess
    import sys

    code = ("import sys, lmforge.infer.generate, lmforge.infer.beam, lmforge.kernels; "
            "print(sorted(m for m in sys.modules if m.startswith('lmforge.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
