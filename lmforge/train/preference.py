"""Preference objectives: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023), as TRL's DPOTrainer defines them.

With pi the policy being trained and ref the reference model, the log-ratio of an answer y to a prompt x
is log pi(y | x) - log ref(y | x), summed over the answer's tokens, and its reward is beta times it:

    sigmoid (DPO):  -log sigmoid(beta * (ratio(chosen) - ratio(rejected)))
    ipo:            (ratio(chosen) / |chosen| - ratio(rejected) / |rejected| - 1 / (2 beta))^2   (per-token means)

Each averaged over the pairs of a batch. The reference's log-probabilities are computed once, before
training (`reference_logprobs`), so no second model stays in memory; a batch carries them (`reference`).

    objective = PreferenceLoss(beta=0.1, loss="sigmoid")
    trainer = Trainer(model, config, out, batches=..., loss_fn=objective)    # rows: B chosen, then B rejected
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from lmforge.data.preference import PreferencePair, collate_preferences
from lmforge.data.sft import IGNORE
from lmforge.errors import UserError
from lmforge.infer import model_device

LOSSES = ("sigmoid", "ipo")


def answer_logprobs(model, batch: dict[str, torch.Tensor], native: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(answer | prompt) of each row (2B,), summed over its answer tokens, and the number of those tokens.

    A native model runs the head only on the answer positions (`token_logprobs`); another (a transformers
    model) returns logits, which are log-softmaxed in fp32."""
    targets = batch["targets"]
    if native:
        per_token = model(batch["ids"], targets=targets, token_logprobs=True)
    else:
        out = model(batch["ids"])
        logits = getattr(out, "logits", out).float()
        per_token = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                     reduction="none").view(targets.shape)
    return per_token.sum(dim=1), (targets != IGNORE).sum(dim=1)


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
                    loss: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss of B pairs from (2B,) log-probabilities of the policy and the reference and answer token
    counts (B chosen, then B rejected); and per pair: rewards of chosen and rejected, margin, whether
    chosen's reward is higher."""
    chosen_ratio, rejected_ratio = (policy - reference).chunk(2)
    if loss == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss == "ipo":
        chosen_count, rejected_count = counts.clamp(min=1).chunk(2)
        per_pair = (chosen_ratio / chosen_count - rejected_ratio / rejected_count - 1 / (2 * beta)) ** 2
    else:
        raise UserError(f"--loss {loss}: expected one of {', '.join(LOSSES)}")
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
             "margin": chosen_reward - rejected_reward, "reward_accuracy": (chosen_reward > rejected_reward).float()}
    return per_pair.mean(), stats


class PreferenceLoss:
    """The Trainer's objective for preference pairs (module docstring). It also keeps the running means of
    the training batches' rewards, margin and reward accuracy until `take_stats()`."""

    def __init__(self, beta: float, loss: str = "sigmoid", native: bool = True):
        check_settings(beta, loss)
        self.beta, self.loss, self.native = beta, loss, native
        self.sums: dict[str, float] = {}
        self.pairs = 0

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        policy, counts = answer_logprobs(model, batch, self.native)
        loss, stats = preference_loss(policy, batch["reference"], counts, self.beta, self.loss)
        for name, values in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.pairs += len(policy) // 2
        return loss

    def take_stats(self) -> dict[str, float]:
        """The means since the last call, as train_NAME, and start again."""
        means = {f"train_{name}": total / self.pairs for name, total in self.sums.items()} if self.pairs else {}
        self.sums, self.pairs = {}, 0
        return means


def check_settings(beta: float, loss: str) -> None:
    if not (beta > 0 and math.isfinite(beta)):
        raise UserError(f"--beta {beta}: expected a positive number (0.1 is usual)")
    if loss not in LOSSES:
        raise UserError(f"--loss {loss}: expected one of {', '.join(LOSSES)}")


def _batches(pairs: Sequence[PreferencePair], batch_size: int) -> list[list[int]]:
    """Indices of `pairs` in batches of similar lengths (little padding)."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + max(len(pairs[i].chosen),
                                                                                  len(pairs[i].rejected)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def reference_logprobs(model, pairs: Sequence[PreferencePair], batch_size: int, pad_id: int,
                       native: bool = True) -> list[PreferencePair]:
    """`pairs` with `reference` set to the model's log p(chosen), log p(rejected) (the model in eval mode)."""
    from tqdm.auto import tqdm

    training = model.training
    model.eval()
    out = list(pairs)
    device = model_device(model)
    for members in tqdm(_batches(pairs, batch_size), desc="reference log-probabilities", leave=False):
        logps, _ = answer_logprobs(model, collate_preferences([pairs[i] for i in members], pad_id, device), native)
        chosen, rejected = logps.chunk(2)
        for row, i in enumerate(members):
            out[i] = replace(pairs[i], reference=(float(chosen[row]), float(rejected[row])))
    model.train(training)
    return out


@torch.no_grad()
def evaluate_preferences(model, pairs: Sequence[PreferencePair], batch_size: int, pad_id: int, beta: float,
                         loss: str = "sigmoid", native: bool = True) -> dict[str, float]:
    """On held-out pairs (with their reference): `val_loss` (the objective), `reward_accuracy`, `margin`,
    `chosen_reward`, `rejected_reward` (means over the pairs) and `chosen_nll`, the mean negative
    log-likelihood per token of the chosen answers (how well the model still writes the preferred answer)."""
    device = model_device(model)
    sums: dict[str, float] = {}
    total_loss, nll, tokens = 0.0, 0.0, 0
    for members in _batches(pairs, batch_size):
        batch = collate_preferences([pairs[i] for i in members], pad_id, device)
        policy, counts = answer_logprobs(model, batch, native)
        value, stats = preference_loss(policy, batch["reference"], counts, beta, loss)
        total_loss += float(value) * len(members)
        for name, values in stats.items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
        nll -= float(policy[:len(members)].sum())
        tokens += int(counts[:len(members)].sum())
    n = len(pairs)
    return {"val_loss": total_loss / n, **{name: total / n for name, total in sums.items()},
            "chosen_nll": nll / max(tokens, 1)}
