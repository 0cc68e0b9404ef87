"""Adversarial training of a text generator (SeqGAN-style): the discriminator, the rewards it gives, and the
REINFORCE estimator that turns rewards into the generator's gradient.

    pair = GANPair(generator, Discriminator(copy.deepcopy(generator)))   # one module for the one Trainer
    logits = pair.discriminator(ids)                      # (B, T): how real each prefix ids[:, :t+1] looks
    returns = returns_to_go(prefix_rewards(logits), mask, discount)      # or rollout_rewards(...): SeqGAN's Q
    loss = reinforce_loss(logprobs, advantages(returns, mask), mask)     # its gradient: REINFORCE's estimate

Text is sampled token by token, so the discriminator's verdict has no gradient with respect to the generator's
weights; REINFORCE gives one: grad E[R] = E[sum_t A_t grad log p(x_t | x_<t)], estimated from sampled
sequences. `reinforce_loss` is the surrogate whose gradient is that estimate (negated, to be minimised).

Rewards, two ways (`lmforge.recipes.gan` --reward):
- `prefix` (the default, cheap): the discriminator is causal and scores every prefix, so token t gets the
  reward r_t = 2 sigmoid(D(x_<=t)) - 1 (in [-1, 1]; 0 where D cannot tell) and the return is the discounted
  sum of the rewards from t on (per-step rewards as in MaliGAN / ScratchGAN);
- `rollout` (SeqGAN): Q_t = the mean reward of K complete sequences sampled from the prefix x_<=t by the
  generator (Monte-Carlo roll-outs through `lmforge.infer.generate.generate_ids`, all in one batched call),
  and the reward of the whole sequence at its last token.
The baseline of a return is the mean return of the other sequences of the batch at the same position (leave
one out: it does not depend on the sequence itself, so the estimate stays unbiased), and advantages are
divided by their standard deviation (reward normalisation).

Mode collapse shows in the samples: `distinct_n` (the share of distinct n-grams among all n-grams of the
samples) falls and `repeated_share` (samples equal to an earlier one) rises.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lmforge.infer import pad_right
from lmforge.infer.generate import generate_ids

DISCRIMINATOR_WEIGHTS = "discriminator.safetensors"


class Discriminator(nn.Module):
    """A causal decoder `backbone` with a linear real/fake head on every position: logit[b, t] says how real
    the prefix ids[b, :t+1] looks (attention is causal, so it sees nothing after t)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone  # its LM head is not used: it gets no gradient and stays as it was
        self.head = nn.Linear(backbone.config.d_model, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Real/fake logits (B, T) of every prefix of token ids (B, T)."""
        hidden = self.backbone.hidden_states(ids)  # (B, T, d)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def final_logits(self, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
        """The logit (N,) of each whole sequence (its last token's prefix), right-padded in batches."""
        device = self.head.weight.device
        out = []
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_right(rows[start:start + batch_size], pad_id, device)
            last = mask.sum(1) - 1
            out.append(self(ids)[torch.arange(len(ids), device=device), last].float().cpu())
        return torch.cat(out)


class GANPair(nn.Module):
    """The generator and the discriminator as one module, so the one Trainer trains both with one optimizer.

    A checkpoint of it is the generator's own (`save_checkpoint` writes `backbone` after `save_head`):
    `lmforge generate RUN` loads it as any decoder; the discriminator travels beside it in
    `discriminator.safetensors` (its weights, prefixed `backbone.` and `head.`).
    """

    def __init__(self, generator: nn.Module, discriminator: Discriminator):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator

    @property
    def backbone(self) -> nn.Module:
        return self.generator

    @property
    def config(self):
        return self.generator.config

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    def save_head(self, directory: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write the discriminator into a checkpoint being written; return the generator's weights."""
        save_file({k.removeprefix("discriminator."): v for k, v in weights.items() if k.startswith("discriminator.")},
                  directory / DISCRIMINATOR_WEIGHTS)
        return {k.removeprefix("generator."): v for k, v in weights.items() if k.startswith("generator.")}


# ----------------------------------------------------------------------------------------------
# sequences: a start token, the text's tokens, the end token


def as_sequence(body: Sequence[int], eos_id: int, max_tokens: int) -> list[int]:
    """[eos] + body + [eos], the part after the start cut to `max_tokens` (a cut sequence has no end token).

    Real text and samples are made the same way, so the discriminator cannot tell them apart by their form."""
    return [eos_id] + (list(body) + [eos_id])[:max_tokens]


def sample_sequences(generator: nn.Module, n: int, eos_id: int, max_tokens: int, temperature: float = 1.0,
                     seed: int | None = None) -> list[list[int]]:
    """`n` sequences sampled from the start token by the one generate loop (`as_sequence` form)."""
    was_training = generator.training
    generator.eval()  # sampling is the policy without dropout
    new = generate_ids(generator, [[eos_id]] * n, max_new_tokens=max_tokens, temperature=temperature,
                       eos_id=eos_id, seed=seed, use_kernels=False)
    generator.train(was_training)
    return [as_sequence(row, eos_id, max_tokens) for row in new]


def texts_of(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    """The text of each sequence (`as_sequence` form), without its start and end tokens."""
    return [tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in rows]


# ----------------------------------------------------------------------------------------------
# rewards, returns, advantages and the estimator


def prefix_rewards(logits: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (B, T) from the discriminator's prefix logits: 2 sigmoid - 1, in [-1, 1]."""
    return 2 * torch.sigmoid(logits.float()) - 1


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """G_t = r_t + discount * G_{t+1} over each row's real positions (`mask`, right-padded rows); 0 elsewhere."""
    m = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = (rewards[:, t] + discount * running) * m[:, t]
        out[:, t] = running
    return out


@torch.no_grad()
def rollout_rewards(generator: nn.Module, discriminator: Discriminator, rows: Sequence[Sequence[int]],
                    eos_id: int, max_tokens: int, rollouts: int) -> torch.Tensor:
    """SeqGAN's Q values (N, T-1) of the tokens of `rows` (`as_sequence` form; column t is token t + 1):
    the mean reward of `rollouts` completions of the prefix through that token sampled by the generator,
    and for a row's last token the reward of the row itself. Reward: 2 sigmoid(D(whole sequence)) - 1."""
    longest = max(len(r) for r in rows)
    prompts, owners = [], []  # every unfinished prefix, `rollouts` times
    for i, row in enumerate(rows):
        for end in range(2, len(row)):  # the prefix row[:end] ends with token end - 1, not the row's last
            prompts += [list(row[:end])] * rollouts
            owners += [(i, end - 2)] * rollouts
    completed = [list(r) for r in rows]
    if prompts:
        was_training = generator.training
        generator.eval()
        new = generate_ids(generator, prompts, max_new_tokens=max_tokens, eos_id=eos_id, use_kernels=False)
        generator.train(was_training)
        completed += [as_sequence(p[1:] + n, eos_id, max_tokens) for p, n in zip(prompts, new)]
    rewards = prefix_rewards(discriminator.final_logits(completed, eos_id))
    q = torch.zeros(len(rows), longest - 1)
    for i, row in enumerate(rows):
        q[i, len(row) - 2] = rewards[i]
    totals = torch.zeros_like(q)
    for (i, t), reward in zip(owners, rewards[len(rows):].tolist()):
        totals[i, t] += reward
    return q + totals / rollouts


def advantages(returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Returns (B, T) minus a leave-one-out baseline (the mean return of the other rows at the same position),
    divided by their standard deviation; 0 where `mask` is False."""
    m = mask.to(returns.dtype)
    count, total = m.sum(0), (returns * m).sum(0)  # (T,)
    baseline = (total - returns * m) / (count - m).clamp_min(1)
    centred = (returns - baseline) * m
    spread = centred[mask.bool()].std() if mask.sum() > 1 else centred.new_tensor(1.0)
    return centred / (spread + 1e-8)


def reinforce_loss(logprobs: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_b sum_t A_bt log p(x_bt | x_b<t): its gradient is REINFORCE's estimate of -grad E[return].

    `logprobs` (B, T) of the sampled tokens (with gradient), `advantage` (B, T) (treated as a constant)."""
    return -(advantage.detach() * logprobs * mask.to(logprobs.dtype)).sum(1).mean()


def discriminator_loss(real_logits: torch.Tensor, real_mask: torch.Tensor, fake_logits: torch.Tensor,
                       fake_mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over every prefix: real prefixes are 1, sampled ones 0 (each side's mean, halved)."""
    def side(logits: torch.Tensor, mask: torch.Tensor, label: float) -> torch.Tensor:
        losses = F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), label),
                                                    reduction="none")
        return (losses * mask).sum() / mask.sum().clamp_min(1)

    return 0.5 * (side(real_logits, real_mask, 1.0) + side(fake_logits, fake_mask, 0.0))


# ----------------------------------------------------------------------------------------------
# mode collapse


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts' words (0 when there are none): 1 = no repetition."""
    seen, total = set(), 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def repeated_share(texts: Sequence[str]) -> float:
    """The share of texts equal to an earlier one."""
    return 1 - len(set(texts)) / len(texts) if texts else 0.0
