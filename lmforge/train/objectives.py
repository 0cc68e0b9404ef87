"""Training objectives and the batches they eat.

An objective is a function `loss_fn(model, batch) -> scalar loss`; the Trainer calls it for every
micro-batch and knows nothing else about the task. A batch source is a function
`batches(step, part, rows) -> batch`: the batch for an optimizer step is fixed by the step number
alone, and split into `parts` (micro-batches x processes) of `rows` rows. This is what makes a
resumed run continue exactly and a multi-process run see the same data as a single process.

    trainer = Trainer(model, config, out, batches=RandomWindows(tokens, 256, 8, seed=0))   # causal LM
    trainer = Trainer(s2s, config, out, batches=pair_batches(pairs, 8, 0, eos), loss_fn=seq2seq_loss)
    trainer = Trainer(vae, config, out, batches=pair_batches(texts, 8, 0, eos), loss_fn=ElboLoss(elbo_config))

Objectives: `causal_lm_loss` (and `logits_causal_lm_loss` for Hugging Face models), `seq2seq_loss`
(targets given sources), `ElboLoss` (the VAE's negative ELBO with beta annealing and free bits) and
`ConditionalElboLoss` (the conditional VAE's, with a learned prior).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.batches import EpochBatches
from lmforge.data.sft import IGNORE, Example, collate
from lmforge.infer import model_device


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a native model (fused with its output head)."""
    return model(batch["ids"], targets=batch["targets"])


def logits_causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of any model whose output is logits, or has `.logits` (Hugging Face)."""
    out = model(batch["ids"])
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)


class RandomWindows:
    """Random windows of `block_size + 1` tokens from a 1-D token array, chosen by (seed, step)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, device="cpu"):
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill a window of {block_size + 1}")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.device = seed, torch.device(device)

    def __call__(self, step: int, part: int, rows: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        starts = starts[part * rows:(part + 1) * rows]
        return self._batch(starts)

    def __len__(self) -> int:
        """Records for differential privacy: the disjoint windows of block_size + 1 tokens."""
        return len(self.tokens) // (self.block_size + 1)

    def select(self, picks: list[int], step: int, part: int) -> dict[str, torch.Tensor]:
        """The batch of the disjoint windows numbered `picks` (differential privacy's Poisson-sampled batches)."""
        return self._batch(np.asarray(picks, dtype=np.int64) * (self.block_size + 1))

    def _batch(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        windows = np.stack([self.tokens[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        windows = torch.from_numpy(windows).to(self.device)
        return {"ids": windows[:, :-1], "targets": windows[:, 1:]}


@torch.no_grad()
def evaluate_tokens(model, tokens: np.ndarray, block_size: int, batch_size: int = 8,
                    max_windows: int | None = None, device: torch.device | str | None = None) -> dict[str, float]:
    """Mean loss (nats per token) over consecutive windows of `tokens`, and the token count scored
    (batches on `device`; None: the model's).

    Every token after the first is predicted exactly once, from up to `block_size` tokens before it
    (windows do not overlap, so the first tokens of a window see less context).
    """
    n_windows = max(1, (len(tokens) - 1) // block_size)
    if max_windows is not None and n_windows > max_windows:  # evenly spaced subset
        picks = np.linspace(0, n_windows - 1, max_windows).round().astype(int)
    else:
        picks = np.arange(n_windows)
    device = device if device is not None else model_device(model)
    total, count = 0.0, 0
    for i in range(0, len(picks), batch_size):
        starts = picks[i:i + batch_size] * block_size
        length = min(block_size, len(tokens) - 1 - int(starts.max()))
        windows = np.stack([tokens[s:s + length + 1] for s in starts]).astype(np.int64)
        windows = torch.from_numpy(windows).to(device)
        loss = model(windows[:, :-1], targets=windows[:, 1:])
        total += loss.item() * windows[:, 1:].numel()
        count += windows[:, 1:].numel()
    return {"loss": total / count, "tokens": count}


@torch.no_grad()
def calibration_pass(model, sequences: torch.Tensor, hooks: list, batch_size: int = 4) -> None:
    """Run `model` over `sequences` (N, T) in batches for what its hooks (`hooks`, the handles of
    `register_forward_hook` / `register_forward_pre_hook`) collect; the hooks are removed afterwards."""
    try:
        for start in range(0, len(sequences), batch_size):
            model(sequences[start:start + batch_size])
    finally:
        for handle in hooks:
            handle.remove()


def bits_per_byte(loss_nats_per_token: float, tokens: int, utf8_bytes: int) -> float:
    """Bits per UTF-8 byte: comparable between models with different tokenizers."""
    return loss_nats_per_token * tokens / (utf8_bytes * math.log(2))


@torch.no_grad()
def evaluate_examples(model, examples: list[Example], batch_size: int, pad_id: int,
                      device: torch.device | str | None = None, loss_fn=causal_lm_loss) -> float:
    """Mean loss per labelled token over fine-tuning `examples` (batches on `device`; None: the model's)."""
    device = device if device is not None else model_device(model)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, device)
        n = int((batch["targets"] != IGNORE).sum())
        if n:
            total += loss_fn(model, batch).item() * n
            count += n
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# seq2seq: (source, target) pairs


@dataclass(frozen=True)
class Pair:
    """One seq2seq example: source ids and target ids (without the start and end tokens)."""

    source: list[int]
    target: list[int]


def collate_pairs(pairs: Sequence[Pair], eos_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """`source` (B, S) and `source_mask` (right-padded), decoder input `ids` = eos + target and
    `targets` = target + eos (B, T), -100 where padded. End-of-text both starts and ends a target."""
    from lmforge.infer import pad_right

    source, source_mask = pad_right([p.source for p in pairs], eos_id, device)
    length = max(len(p.target) for p in pairs) + 1
    ids = torch.full((len(pairs), length), eos_id, dtype=torch.long, device="cpu")  # filled on the CPU, moved once
    targets = torch.full((len(pairs), length), IGNORE, dtype=torch.long, device="cpu")
    for row, p in enumerate(pairs):
        ids[row, :len(p.target) + 1] = torch.tensor([eos_id] + p.target, device="cpu")
        targets[row, :len(p.target) + 1] = torch.tensor(p.target + [eos_id], device="cpu")
    return {"source": source, "source_mask": source_mask, "ids": ids.to(device), "targets": targets.to(device)}


def pair_batches(pairs: Sequence[Pair], batch_size: int, seed: int, eos_id: int) -> EpochBatches:
    """Shuffled epochs of pairs (`collate_pairs`); each batch also carries its `step` (the VAE objective
    anneals beta by it)."""
    return EpochBatches(pairs, batch_size, seed,
                        lambda items, step, part: {**collate_pairs(items, eos_id), "step": step})


def seq2seq_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens given the source (teacher forcing)."""
    return model(batch["ids"], targets=batch["targets"], source=batch["source"], source_mask=batch["source_mask"])


@torch.no_grad()
def evaluate_pairs(model, pairs: Sequence[Pair], batch_size: int, eos_id: int,
                   device: torch.device | str | None = None) -> float:
    """Mean loss per target token (end-of-text included) over `pairs` (batches on `device`; None: the model's)."""
    device = device if device is not None else model_device(model)
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], eos_id, device)
        n = int((batch["targets"] != IGNORE).sum())
        total += seq2seq_loss(model, batch).item() * n
        count += n
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# vae: the evidence lower bound


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None,
                prior_logvar: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) per dimension, in nats: same shape as mu.

    The prior is N(0, 1) unless given (a conditional VAE's learned prior p(z | article)).
    """
    if prior_mu is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1.0)


def free_bits_kl(kl: torch.Tensor, free_bits: float) -> torch.Tensor:
    """The KL term per sequence with a floor per dimension: sum_d max(free_bits, mean over the batch of kl[:, d]).

    A dimension whose KL is under the floor costs the floor and gets no gradient towards the prior,
    so the encoder may put information into it for free (Kingma et al. 2016).
    """
    return kl.mean(dim=0).clamp(min=free_bits).sum()


class ElboLoss:
    """The VAE objective per target token: (reconstruction cross-entropy + beta(step) * KL term) / tokens.

    `batch` is a pairs batch whose source and target are the same text, with its `step` (for beta).
    With `word_dropout` > 0 that share of the decoder's inputs after the first (the start token) is
    replaced by the start token, so the decoder cannot read the text it rebuilds and must use z.
    """

    def __init__(self, config, max_steps: int):
        self.config, self.max_steps = config.validate(), max_steps

    def __call__(self, model, batch: dict[str, Any]) -> torch.Tensor:
        ids, targets = self.drop_words(batch["ids"]), batch["targets"]
        recon, mu, logvar = model(ids, targets=targets, source=batch["source"], source_mask=batch["source_mask"])
        return self.total(recon, gaussian_kl(mu, logvar), batch)

    def drop_words(self, ids: torch.Tensor) -> torch.Tensor:
        """Word dropout of the decoder's inputs (the first, the start token, always stays)."""
        if self.config.word_dropout == 0:
            return ids
        drop = torch.rand(ids.shape, device=ids.device) < self.config.word_dropout
        drop[:, 0] = False
        return torch.where(drop, ids[:, :1], ids)  # the start token stands for a missing word

    def total(self, recon: torch.Tensor, kl: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """recon (mean per token) + beta(step) * the free-bits KL term (kl: (B, D)) per token."""
        beta = self.config.beta_at(int(batch["step"]), self.max_steps)
        tokens = (batch["targets"] != IGNORE).sum().clamp(min=1)
        return recon + beta * free_bits_kl(kl, self.config.free_bits) * len(kl) / tokens


class ConditionalElboLoss(ElboLoss):
    """The conditional VAE's objective per target token: -log p(summary | article, z) + beta * KL(q || p) / tokens.

    `batch` is a pairs batch (source = article, target = summary) with its `step`; z is drawn from the
    posterior q(z | article, summary), and the KL is to the learned prior p(z | article).
    """

    def __call__(self, model, batch: dict[str, Any]) -> torch.Tensor:
        targets = batch["targets"]
        recon, mu, logvar, prior_mu, prior_logvar = model(
            self.drop_words(batch["ids"]), targets=targets, source=batch["source"], source_mask=batch["source_mask"],
            posterior_target=targets.clamp(min=0), posterior_mask=targets != IGNORE)  # the summary and its end
        return self.total(recon, gaussian_kl(mu, logvar, prior_mu, prior_logvar), batch)
