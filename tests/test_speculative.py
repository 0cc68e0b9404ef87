"""Tests of speculative decoding (lmforge.infer.speculative through the generate loop): greedy output
identical to the model alone, the sampled distribution equal to the model's, stop strings, streaming,
and every bad input as a one-line error."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import corpus_documents

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer import warp_logits
from lmforge.infer.generate import generate, generate_ids
from lmforge.infer.speculative import PromptLookup
from lmforge.models.decoder import Decoder
from lmforge.models.seq2seq import Seq2Seq
from lmforge.tokenizer import train_tokenizer
from lmforge.train.checkpoint import save_checkpoint


def lively(make_model, style: str = "llama", seed: int = 0, scale: float = 3.0, **overrides) -> Decoder:
    """A random model whose greedy output does not just repeat one token (untied head, weights scaled up)."""
    model = make_model(style, seed=seed, tie_embeddings=False, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def nudged(model: Decoder, noise: float, seed: int = 1) -> Decoder:
    """A copy of `model` with noise on its weights: a draft that agrees with it often, not always."""
    copy = Decoder(model.config).eval()
    copy.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    return copy


def prompts(vocab: int, lengths=(3, 9, 14), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_greedy_output_is_the_models_own(make_model, style):
    """Every drafter, every K, prompts that reach the context (block 32: the window slides): token for token
    the output of the model alone. A nudged draft is rejected sometimes, the model itself never."""
    model = lively(make_model, style)
    drafts = {"other": nudged(model, 0.3), "same": model, "prompt-lookup": "prompt-lookup"}
    seen: dict[str, dict[str, int]] = {name: {} for name in drafts}
    for prompt, k in itertools.product(prompts(384), (1, 3, 6)):
        alone = generate_ids(model, [prompt], 40, temperature=0, use_kernels=False)
        for name, draft in drafts.items():
            stats = seen[name]
            got = generate_ids(model, [prompt], 40, temperature=0, draft=draft, draft_tokens=k, stats=stats,
                               use_kernels=False)
            assert got == alone, (name, prompt, k)
    assert 0 < seen["other"]["accepted"] < seen["other"]["drafted"]
    same: dict[str, int] = {}  # within the context (no slide: the draft's window would differ), all kept
    generate_ids(model, [prompts(384)[0]], 25, temperature=0, draft=model, draft_tokens=3, stats=same,
                 use_kernels=False)
    assert same["accepted"] == same["drafted"] > 0
    assert seen["prompt-lookup"]["drafted"] > 0
    for stats in seen.values():
        assert stats["new_tokens"] == 40 * 9 and stats["passes"] < stats["new_tokens"] + 9


def test_repetition_penalty_and_eos_greedy(make_model):
    model = lively(make_model, vocab_size=48)
    prompt = prompts(48)[1]
    alone = generate_ids(model, [prompt], 30, temperature=0, repetition_penalty=1.3, use_kernels=False)
    for draft in (nudged(model, 0.3), "prompt-lookup"):
        assert generate_ids(model, [prompt], 30, temperature=0, repetition_penalty=1.3, draft=draft,
                            use_kernels=False) == alone
    eos = alone[0][5]  # a token the output holds: it ends there
    cut = generate_ids(model, [prompt], 30, temperature=0, eos_id=eos, use_kernels=False)
    assert generate_ids(model, [prompt], 30, temperature=0, eos_id=eos, draft=model, use_kernels=False) == cut


def test_prompt_lookup_proposes_what_followed_the_earliest_match():
    lookup = PromptLookup()
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]  # "2 3" first followed by 4 9
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3, 7], 3) == []  # 7 never occurred before
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3, 7, 1], 5) == [2, 3, 4, 9, 2]


def exact_joint(model: Decoder, prompt: list[int], vocab: int, warp: dict, draft: Decoder | None = None
                ) -> torch.Tensor:
    """P(t1, t2, t3) (vocab, vocab, vocab) after `prompt`: t1 from `model`, t2 and t3 from `draft` (None: the
    model), each distribution warped by `warp` as sampling warps it. Computed over every prefix at once."""
    pairs = torch.tensor(list(itertools.product(range(vocab), repeat=2)))  # (V*V, 2)
    ids = torch.cat([torch.tensor(prompt).expand(len(pairs), -1), pairs], dim=1)
    with torch.no_grad():
        first = warp_logits(model(ids[:1, :len(prompt)])[:, -1], **warp).softmax(-1)[0]  # (V,)
        later = warp_logits((draft or model)(ids)[:, -2:].flatten(0, 1), **warp).softmax(-1).view(len(pairs), 2, -1)
    p2 = later[:, 0].view(vocab, vocab, vocab)[:, 0]  # p(t2 | t1): the same for every t2 of the pair
    p3 = later[:, 1].view(vocab, vocab, vocab)  # p(t3 | t1, t2)
    return first[:, None, None] * p2[:, :, None] * p3


def chi_square(counts: torch.Tensor, exact: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of observed `counts` against probabilities `exact`, and its degrees of freedom."""
    expected = exact * counts.sum()
    cells = expected > 0
    return float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()), int(cells.sum()) - 1


@pytest.mark.parametrize("drafter", ["model", "prompt-lookup"])
def test_sampling_keeps_the_models_distribution(make_model, drafter):
    """The first three tokens of 2000 seeded samples (temperature and top-k on) against their exact joint
    distribution under the model (5 * 5 * 5 cells): Pearson's chi-square within 4 standard deviations of
    its mean, no sample where top-k leaves no probability; and the joint that a wrong rule (always keep
    the draft) would give is rejected by the same test, by a factor of 5 and more."""
    vocab, warp = 5, dict(temperature=0.9, top_k=4)
    model = lively(make_model, vocab_size=vocab, scale=2.0)
    draft = lively(make_model, vocab_size=vocab, scale=2.0, seed=5, n_layer=1)
    prompt = [1, 2, 3, 1, 2, 4, 1, 2]  # prompt lookup drafts after "1 2" and after "2 3", "2 4"
    n = 2000
    counts = torch.zeros(vocab, vocab, vocab)
    stats: dict[str, int] = {}
    for seed in range(n):
        ids = generate_ids(model, [prompt], 4, draft=draft if drafter == "model" else drafter, draft_tokens=2,
                           seed=seed, stats=stats, use_kernels=False, **warp)
        counts[tuple(ids[0][:3])] += 1
    assert stats["drafted"] > n and 0 < stats["accepted"] < stats["drafted"]
    exact = exact_joint(model, prompt, vocab, warp)
    assert counts[exact == 0].sum() == 0
    statistic, df = chi_square(counts, exact)
    assert statistic < df + 4 * (2 * df) ** 0.5, (statistic, df)
    if drafter == "model":
        wrong = exact_joint(model, prompt, vocab, warp, draft)
        torch.manual_seed(0)
        drawn = torch.distributions.Multinomial(n, wrong.flatten()).sample().view_as(wrong)
        assert chi_square(drawn, exact)[0] > 5 * (df + 4 * (2 * df) ** 0.5)


def test_stop_strings_and_streaming_through_speculation(make_model, tokenizer):
    """The texts of `generate` (stop strings cut, streamed pieces) are the same with a draft as without."""
    model = lively(make_model, vocab_size=tokenizer.vocab_size, block_size=64)
    model.tokenizer = tokenizer
    options = dict(max_new_tokens=30, temperature=0, use_kernels=False)
    full = generate(model, "Shall I compare", **options)[0]
    assert len(full) > 6
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = generate(model, "Shall I compare", stop=[stop], **options)[0]
    for draft in (nudged(model, 0.3), "prompt-lookup"):
        pieces: list[str] = []
        got = generate(model, "Shall I compare", stop=[stop], stream=pieces.append, draft=draft, **options)
        assert got == [expected] and "".join(pieces) == expected
        # several prompts and samples: one sequence at a time, in the usual order
        assert generate(model, ["Shall I", "So long"], draft=draft, **options) == \
            generate(model, ["Shall I", "So long"], **options)
    sampled = generate(model, "Shall I", num_samples=3, seed=0, temperature=1.0, max_new_tokens=8, draft=model,
                       use_kernels=False)
    assert len(sampled) == 3 and len(set(sampled)) > 1  # each sample its own seed


def test_bad_drafts_are_user_errors(make_model, make_config, tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNELS", "off")  # no first-use kernel races in the command-line runs
    model = lively(make_model, vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    with pytest.raises(UserError, match="draft-tokens"):
        generate_ids(model, [[1, 2]], 5, draft="prompt-lookup", draft_tokens=0)
    with pytest.raises(UserError, match="expected a draft model or 'prompt-lookup'"):
        generate(model, "x", draft="ngrams")
    with pytest.raises(UserError, match="vocabulary"):
        generate_ids(model, [[1, 2]], 5, draft=make_model("llama", vocab_size=100))
    with pytest.raises(UserError, match="one prompt at a time"):
        generate_ids(model, [[1, 2], [3]], 5, draft=model)
    with pytest.raises(UserError, match="beam"):
        generate(model, "x", draft=model, beam_size=2)
    seq2seq = Seq2Seq(make_config("gpt2", kind="seq2seq", vocab_size=tokenizer.vocab_size, n_encoder_layer=1)).eval()
    with pytest.raises(UserError, match="decoder-only"):
        generate(seq2seq, "x", tokenizer=tokenizer, draft="prompt-lookup")
    # the command line: a draft whose tokenizer differs (same size, other ids) is one line and exit 2
    other = train_tokenizer([d.text[::-1] for d in corpus_documents()], vocab_size=384, show_progress=False)
    assert other.vocab_size == tokenizer.vocab_size  # the same size, other merges
    target = save_checkpoint(tmp_path / "target", model, tokenizer)
    assert main(["generate", str(target), "--prompt", "Shall", "--max-new-tokens", "3", "--draft-tokens", "0",
                 "--draft", "prompt-lookup"]) == 2
    assert "--draft-tokens = 0" in capsys.readouterr().err
    draft = save_checkpoint(tmp_path / "draft", make_model("llama", vocab_size=tokenizer.vocab_size), other)
    assert main(["generate", str(target), "--prompt", "Shall", "--draft", str(draft)]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer differs" in err and "\n" not in err
    assert main(["generate", str(target), "--prompt", "Shall", "--max-new-tokens", "3", "--temperature", "0",
                 "--draft", str(target)]) == 0
