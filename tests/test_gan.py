"""GAN training (lmforge.train.adversarial, lmforge.recipes.gan) and the sample metrics of bench/gan.py: the REINFORCE
estimator against the exact gradient of an expected return on a toy policy small enough to enumerate; returns and
roll-out rewards against direct computations; BLEU against NLTK; one `lmforge gan train` run in which both
networks learn and whose output `lmforge generate` loads; bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import SONNET
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.data import Document, prepare
from lmforge.eval.metrics import reference_bleu, self_bleu
from lmforge.models import build_model
from lmforge.recipes.classify import Classifier
from lmforge.recipes.gan import phase_of, read_lines, sample_scores, train_gan
from lmforge.train.adversarial import (
    DISCRIMINATOR_WEIGHTS,
    Discriminator,
    advantages,
    as_sequence,
    distinct_n,
    prefix_rewards,
    reinforce_loss,
    repeated_share,
    returns_to_go,
    rollout_rewards,
)
from lmforge.train.checkpoint import load_weights, save_checkpoint

# ----------------------------------------------------------------------------------------------
# the estimator on a toy policy: two tokens from a vocabulary of three


def _toy():
    torch.manual_seed(0)
    first = torch.randn(3, requires_grad=True)  # logits of token 1
    second = torch.randn(3, 3, requires_grad=True)  # logits of token 2 given token 1
    r1 = torch.tensor([0.3, -1.0, 0.8])  # reward of token 1
    r2 = torch.randn(3, 3)  # reward of token 2 given token 1
    return first, second, r1, r2


def _exact_gradient(first, second, r1, r2, discount):
    """The gradient the estimator is unbiased for, enumerating the 9 sequences: each token's logits get the
    gradient of the expected return from that token on, discount^(s-t) r_s (with discount 1: the gradient of
    the expected total reward)."""
    p1, p2 = first.softmax(-1), second.softmax(-1)

    def expected(d):
        return sum(p1[a] * p2[a, b] * (r1[a] + d * r2[a, b]) for a, b in itertools.product(range(3), repeat=2))

    return (torch.autograd.grad(expected(discount), first, retain_graph=True)[0],
            torch.autograd.grad(expected(1.0), second)[0])  # token 2 cannot change r1: its return is r2


def _estimated_gradient(first, second, r1, r2, discount, n, baseline):
    generator = torch.Generator().manual_seed(1)
    a = torch.multinomial(first.softmax(-1).detach().expand(n, 3), 1, generator=generator).squeeze(1)
    b = torch.multinomial(second.softmax(-1).detach()[a], 1, generator=generator).squeeze(1)
    logprobs = torch.stack([first.log_softmax(-1)[a], second.log_softmax(-1)[a, b]], dim=1)  # (n, 2)
    mask = torch.ones(n, 2, dtype=torch.bool)
    returns = returns_to_go(torch.stack([r1[a], r2[a, b]], dim=1), mask, discount)
    advantage = baseline(returns, mask)
    loss = reinforce_loss(logprobs, advantage, mask)
    return [-g for g in torch.autograd.grad(loss, [first, second])]  # the loss is the negated objective


@pytest.mark.parametrize("discount", [1.0, 0.5])
def test_reinforce_estimator_matches_the_exact_gradient_of_the_expected_return(discount):
    first, second, r1, r2 = _toy()
    exact = _exact_gradient(first, second, r1, r2, discount)
    for name, baseline in [("none", lambda g, m: g), ("constant", lambda g, m: g - 0.7)]:
        estimate = _estimated_gradient(first, second, r1, r2, discount, 400_000, baseline)
        for e, x in zip(estimate, exact):
            torch.testing.assert_close(e, x, atol=0.012, rtol=0.0, msg=lambda m, name=name: f"baseline {name}: {m}")


def test_the_leave_one_out_baseline_keeps_the_direction_and_cuts_the_variance():
    first, second, r1, r2 = _toy()
    r1 = r1 + 5.0  # a large common offset: what a baseline removes
    exact = torch.cat([g.flatten() for g in _exact_gradient(first, second, r1, r2, 1.0)])
    normalised = torch.cat([g.flatten() for g in _estimated_gradient(first, second, r1, r2, 1.0, 200_000, advantages)])
    assert torch.nn.functional.cosine_similarity(normalised, exact, dim=0) > 0.995

    def spread(baseline):  # the standard deviation of estimates from batches of 64, over 40 batches
        estimates = []
        for seed in range(40):
            g = torch.Generator().manual_seed(seed)
            a = torch.multinomial(first.softmax(-1).detach().expand(64, 3), 1, generator=g).squeeze(1)
            b = torch.multinomial(second.softmax(-1).detach()[a], 1, generator=g).squeeze(1)
            logprobs = torch.stack([first.log_softmax(-1)[a], second.log_softmax(-1)[a, b]], dim=1)
            mask = torch.ones(64, 2, dtype=torch.bool)
            returns = returns_to_go(torch.stack([r1[a], r2[a, b]], dim=1), mask, 1.0)
            grad = torch.autograd.grad(reinforce_loss(logprobs, baseline(returns, mask), mask), [first])[0]
            estimates.append(grad)
        return torch.stack(estimates).std(0).sum()

    def unnormalised_leave_one_out(returns, mask):
        n = returns.shape[0]
        return returns - (returns.sum(0) - returns) / (n - 1)

    assert spread(unnormalised_leave_one_out) < 0.5 * spread(lambda g, m: g)


def test_returns_to_go_follow_each_row_to_its_end():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = returns_to_go(rewards, mask, 0.5)
    expected = [[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0], [4 + 0.5 * 5, 5.0, 0.0]]
    torch.testing.assert_close(out, torch.tensor(expected))
    adv = advantages(out, mask)
    assert adv[1, 2] == 0 and torch.isfinite(adv).all()


def test_rollout_rewards_score_completions_of_every_prefix(make_model, tokenizer):
    generator = make_model("gpt2", seed=1, vocab_size=tokenizer.vocab_size, block_size=32)
    discriminator = Discriminator(make_model("gpt2", seed=2, vocab_size=tokenizer.vocab_size, block_size=32)).eval()
    eos = tokenizer.eos_id
    rows = [as_sequence([5, 6, 7], eos, 8), as_sequence([9, 10, 11, 12, 13, 14, 15, 16, 17], eos, 8)]
    q = rollout_rewards(generator, discriminator, rows, eos, 8, rollouts=3)
    assert q.shape == (2, 8)  # the tokens after the start of the longer row
    whole = prefix_rewards(discriminator.final_logits(rows, eos))
    assert q[0, 3] == pytest.approx(whole[0].item()) and q[1, 7] == pytest.approx(whole[1].item())  # last tokens
    assert (q[0, 4:] == 0).all() and (q.abs() <= 1).all()
    assert len(set(q[1, :7].tolist())) > 1  # the roll-outs of different prefixes score differently


def test_adamw_leaves_a_network_without_gradient_as_it_was():
    """A discriminator step gives the generator no gradient (and a generator step the discriminator): the
    optimizer the Trainer builds, fused or not, must neither move nor decay those parameters."""
    from lmforge.config import TrainConfig
    from lmforge.train.optim import build_optimizer

    for fused in (False, True):
        torch.manual_seed(0)
        stepped, idle = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        params = [*stepped.parameters(), *idle.parameters()]
        optimizer = build_optimizer(["a.weight", "a.bias", "b.weight", "b.bias"], params,
                                    TrainConfig(weight_decay=0.5, lr=0.1), fused=fused)
        before = [p.detach().clone() for p in params]
        for _ in range(2):
            stepped(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert not torch.equal(before[0], params[0]) and all(torch.equal(b, p) for b, p in zip(before[2:], params[2:]))


# ----------------------------------------------------------------------------------------------
# metrics of samples


def test_bleu_of_samples_equals_nltk_and_diversity_sees_repeats():
    nltk = pytest.importorskip("nltk.translate.bleu_score")
    lines = SONNET.splitlines()
    samples = [lines[0], lines[1][:20], "thou art the summer of the day", "day", lines[0]]
    smooth = nltk.SmoothingFunction().method1
    expected = sum(nltk.sentence_bleu([r.split() for r in lines[2:]], s.split(), smoothing_function=smooth)
                   for s in samples) / len(samples)
    assert reference_bleu(samples, lines[2:]) == pytest.approx(100 * expected)
    expected_self = sum(nltk.sentence_bleu([o.split() for j, o in enumerate(samples) if j != i], s.split(),
                                           smoothing_function=smooth) for i, s in enumerate(samples)) / len(samples)
    assert self_bleu(samples) == pytest.approx(100 * expected_self)
    assert repeated_share(samples) == pytest.approx(0.2)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert [phase_of(s, 2, 3) for s in range(9)] == ["discriminator"] * 5 + ["generator"] + ["discriminator"] * 2 + \
        ["generator"]


# ----------------------------------------------------------------------------------------------
# the recipe, end to end


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tokenizer) -> Path:
    """A tiny decoder pretrained for a few steps on the sonnet's lines, one document (ending in eos) each."""
    root = tmp_path_factory.mktemp("gan")
    (root / "lines.txt").write_text(SONNET * 3)
    docs = [Document(f"line{i}", line) for i, line in enumerate(SONNET.splitlines() * 6)]
    prepare(docs, tokenizer, root / "data", val_fraction=0.2, show_progress=False)
    from lmforge.recipes.pretrain import pretrain

    pretrain(root / "data", root / "mle", preset="tiny", overrides={
        "model.block_size": 32, "model.d_model": 32, "train.max_steps": 40, "train.batch_size": 8,
        "train.eval_interval": 40, "train.warmup_steps": 4, "train.lr": 3e-3, "train.precision": "fp32",
        "train.eval_batches": 1})
    return root


def test_gan_train_updates_both_networks_logs_and_saves_a_generator(generator, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mle = generator / "mle"
    assert main(["gan", "train", "--generator", str(mle), "--data", str(generator / "lines.txt"), "--out", "run",
                 "--train.max_steps", "8", "--d-warmup", "2", "--train.batch_size", "4", "--train.eval_interval",
                 "4", "--eval-samples", "4", "--max-tokens", "16", "--val-fraction", "0.2", "--train.lr", "1e-3"]) == 0
    out = capsys.readouterr()
    assert "discriminator accuracy" in out.out and "the generator is in run" in out.out
    before, after = load_weights(mle / "checkpoint"), load_weights(tmp_path / "run" / "checkpoint")
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the generator learned
    discriminator = load_file(tmp_path / "run" / "checkpoint" / DISCRIMINATOR_WEIGHTS)
    assert any(not torch.equal(before[k], discriminator[f"backbone.{k}"]) for k in before)  # started as a copy
    assert discriminator["head.bias"].abs().item() > 0  # the head starts at zero
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "d_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert {"val_bpb", "distinct_2", "repeated", "mode_collapse", "train_d_loss", "train_pg_loss",
            "train_mle_loss", "train_reward"} <= set(evals[-1])
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [0, 4, 8]
    assert not any("<|endoftext|>" in text for r in samples for text in r["samples"])
    assert (tmp_path / "run" / "gan.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_bpb_before"] > 0 and "mode_collapse_evals" in summary
    assert main(["generate", "run", "--prompt", "Shall I", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_rollout_rewards_train_through_the_python_twin(generator, tmp_path):
    summary = train_gan(generator / "mle", SONNET.splitlines() * 2, tmp_path / "run", reward="rollout", rollouts=2,
                        d_warmup=1, max_tokens=10, eval_samples=4, val_data=SONNET.splitlines()[:4],
                        overrides={"train.max_steps": 3, "train.batch_size": 4, "train.eval_interval": 3})
    assert summary["step"] == 3 and "train_pg_loss" in summary and "train_d_loss" in summary


def test_mode_collapse_is_flagged_by_repeats_or_few_distinct_bigrams():
    real = SONNET.splitlines()
    assert sample_scores(real[:8], real)["mode_collapse"] == 0.0
    assert sample_scores([real[0]] * 4 + real[1:6], real)["mode_collapse"] == 1.0  # a third repeated
    loops = [f"and the and the and the {w}" for w in "abcdefgh"]  # none repeated, few distinct bigrams
    scores = sample_scores(loops, real)
    assert scores["repeated"] == 0.0 and scores["mode_collapse"] == 1.0


def test_read_lines_keeps_lines_of_words_not_speaker_names(tmp_path):
    (tmp_path / "play.txt").write_text("ROMEO.\nBut soft, what light through yonder window breaks?\n\nO Romeo\n")
    assert read_lines(tmp_path / "play.txt") == ["But soft, what light through yonder window breaks?"]


@pytest.fixture(scope="module")
def not_generators(tmp_path_factory, tokenizer, make_model) -> Path:
    root = tmp_path_factory.mktemp("not-generators")
    save_checkpoint(root / "classifier", Classifier(make_model("gpt2", vocab_size=tokenizer.vocab_size), ["a", "b"]),
                    tokenizer)
    config = ModelConfig(kind="seq2seq", vocab_size=tokenizer.vocab_size, block_size=24, n_layer=1, n_encoder_layer=1,
                         n_head=2, d_model=32).validate()
    save_checkpoint(root / "seq2seq", build_model(config), tokenizer)
    (root / "short.txt").write_text("one line of four words\nand another of five words\n")
    return root


@pytest.mark.parametrize("case, message", [
    ("classifier", "is a classifier checkpoint; expected a decoder"),
    ("seq2seq", "is a seq2seq model; expected a decoder"),
    ("short", "only 1 training line(s) of at least 4 words; a batch needs train.batch_size = 16"),
    ("rollouts", "--rollouts = 0; expected at least 1 roll-out per prefix"),
    ("steps", "train.max_steps = 0; expected a positive integer"),
    ("tokens", "--max-tokens = 40: a sequence (the start token and 40 more) must fit the generator's context of 32"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, message, generator, not_generators, tmp_path, monkeypatch,
                                                  capsys):
    monkeypatch.chdir(tmp_path)
    model = {"classifier": not_generators / "classifier", "seq2seq": not_generators / "seq2seq"}.get(
        case, generator / "mle")
    data = not_generators / "short.txt" if case == "short" else generator / "lines.txt"
    extra = {"rollouts": ["--reward", "rollout", "--rollouts", "0"], "steps": ["--train.max_steps", "0"],
             "tokens": ["--max-tokens", "40"]}.get(case, []) + (["--max-tokens", "16"] if case != "tokens" else [])
    assert main(["gan", "train", "--generator", str(model), "--data", str(data), "--out", "run", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
