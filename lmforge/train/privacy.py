"""Differentially private training (DP-SGD) in the one Trainer, through Opacus.

    lmforge finetune smollm2-135m-instruct chatterbot --out runs/dp --method lora --train.dp.epsilon 8
    lmforge classify train smollm2-135m-instruct rotten_tomatoes --out runs/rt-dp --method lora \\
        --train.dp.epsilon 3 --train.dp.max_grad_norm 1 --train.batch_size 64 --train.grad_accum 4

`train.dp_epsilon` (`--train.dp.epsilon`) turns it on for every verb whose batches are drawn from a list of
training examples (`lmforge.data.batches.EpochBatches`: finetune and chat SFT, classify, summarize/translate,
seq2seq and VAE) and for pretraining (its records: disjoint windows of block_size + 1 tokens). Each step:

1. **Poisson sampling**: every training example joins the step's batch on its own with probability
   q = batch_size / N (`batch_size` is the batch's expected size), from secret randomness: the amplification by
   sampling that the accountant counts on holds only if nobody can tell who was drawn;
2. **per-example gradients** from Opacus's `GradSampleModule` (its grad samplers for Linear, Embedding and
   LayerNorm, functorch for other modules, e.g. RMSNorm); the model's loss is the mean over examples of each
   one's mean token loss, made through the head module (`LanguageModel.per_example_loss`);
3. Opacus's `DPOptimizer` **clips** each example's gradient to `dp_max_grad_norm` (C), sums them, adds Gaussian
   noise N(0, (sigma C)^2) and divides by the expected batch size, then AdamW steps;
4. a batch larger than `batch_size / grad_accum` rows runs as several physical micro-batches whose clipped
   gradients are summed before the one noisy step (Opacus's BatchMemoryManager does the same, through
   `signal_skip_step`), so memory bounds the micro-batch, not the logical batch.

The noise multiplier sigma comes from Opacus's PRV accountant (its PrivacyEngine's default): the smallest sigma for
which `max_steps` steps at rate q spend at most epsilon at delta (default 1/N). Epsilon spent so far is logged at
every evaluation (`metrics.jsonl`, the progress line) and stored with the privacy settings in the checkpoint's
`lmforge.json` (`privacy`); training stops when the budget's steps are done (a resumed run keeps its sigma and its
budget, whatever max_steps says).

What DP changes: fp32 (`auto` picks it; bf16/fp16 are refused: per-example norms in low precision), no training
kernels (their custom autograd functions do not give per-example gradients), no activation checkpointing, one
process (not torchrun), AdamW. A resumed run continues with fresh randomness (not bit-exact, unlike other runs):
noise or sampling reproducible from anything stored would void the guarantee. The noise comes from torch's
generator seeded from the OS's entropy, not a cryptographic generator (Opacus's `secure_mode` needs torchcsprng,
which has no build for this torch).

The first micro-batch checks that every trained parameter's per-example gradients add up to its gradient; a
parameter used outside its module's forward (a custom autograd function, a weight shared with a function call)
would be clipped wrongly, and is named in a one-line error.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.errors import UserError
from lmforge.models.base import LanguageModel

ACCOUNTANT = "prv"  # Opacus's PrivacyEngine default: the privacy random variable accountant (Gopi et al. 2021)


def refuse_unsupported(config: TrainConfig, world: int) -> None:
    """One-line errors for the settings DP-SGD does not train with (see the module docstring)."""
    if world > 1:
        raise UserError("train.dp.epsilon: differentially private training runs in one process; "
                        "run it without torchrun")
    if config.precision in ("bf16", "fp16"):
        raise UserError(f"train.dp.epsilon: train.precision = {config.precision!r}; DP trains in fp32 "
                        f"(per-example gradient norms in low precision); use auto or fp32")
    if config.activation_checkpointing:
        raise UserError("train.dp.epsilon cannot be combined with train.activation_checkpointing (recomputed "
                        "activations would be counted twice by the per-example gradients)")
    if config.optimizer != "adamw":
        raise UserError(f"train.dp.epsilon: train.optimizer = {config.optimizer!r}; DP trains with adamw")
    if config.compile:
        raise UserError("train.dp.epsilon cannot be combined with train.compile")


class PrivateTraining:
    """DP-SGD state of one run: the wrapped model and optimizer, the sampling, the accountant's settings."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                 batches: Any, rows: int) -> None:
        from opacus import GradSampleModule
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        if not callable(getattr(batches, "select", None)) or not hasattr(batches, "__len__"):
            raise UserError(f"train.dp.epsilon: this verb's batches ({type(batches).__name__}) are not drawn from "
                            f"a list of examples, so they cannot be Poisson-sampled")
        self.model, self.batches, self.rows = model, batches, rows
        self.examples = len(batches)
        if config.batch_size > self.examples:
            raise UserError(f"train.dp.epsilon: train.batch_size = {config.batch_size} is more than the "
                            f"{self.examples} training examples")
        self.sample_rate = config.batch_size / self.examples
        self.target_epsilon, self.max_grad_norm = config.dp_epsilon, config.dp_max_grad_norm
        self.delta = config.dp_delta if config.dp_delta is not None else 1 / self.examples
        self.budget_steps = config.max_steps
        try:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.target_epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
                steps=self.budget_steps, accountant=ACCOUNTANT)
        except ValueError as e:
            raise UserError(f"train.dp.epsilon = {self.target_epsilon}: Opacus finds no noise multiplier for "
                            f"{self.budget_steps} steps at sampling rate {self.sample_rate:.4g} and delta "
                            f"{self.delta:.3g} ({e})") from None
        try:
            self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        except NotImplementedError as e:  # Opacus names the module it cannot handle
            raise UserError(f"train.dp.epsilon: Opacus cannot compute per-example gradients of this model: "
                            f"{' '.join(str(e).split())}") from None
        self.generator = torch.Generator(device=next(model.parameters()).device)
        self.generator.manual_seed(secrets.randbits(63))
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=self.max_grad_norm, expected_batch_size=config.batch_size,
                                     loss_reduction="mean", generator=self.generator)
        self.sampler = np.random.default_rng(secrets.randbits(128))
        self.checked = False

    # ------------------------------------------------------------------------------------------
    # accounting

    def epsilon(self, steps: int) -> float:
        """Epsilon spent by `steps` noisy steps (at this run's delta)."""
        from opacus.accountants import create_accountant

        if steps == 0:
            return 0.0
        accountant = create_accountant(ACCOUNTANT)
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(self.delta))

    def record(self, steps: int) -> dict[str, Any]:
        """What `lmforge.json` keeps of the run's privacy (`privacy`)."""
        return {"epsilon": round(self.epsilon(steps), 4), "target_epsilon": self.target_epsilon,
                "delta": self.delta, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "max_grad_norm": self.max_grad_norm, "steps": steps, "budget_steps": self.budget_steps,
                "examples": self.examples, "accountant": ACCOUNTANT, "sampling": "poisson"}

    def state(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "budget_steps": self.budget_steps,
                "sample_rate": self.sample_rate, "delta": self.delta}

    def restore(self, state: dict[str, Any]) -> None:
        """A resumed run keeps the noise and the budget it started with (a changed batch size or data is refused)."""
        if not math.isclose(state["sample_rate"], self.sample_rate) or not math.isclose(state["delta"], self.delta):
            raise UserError(f"cannot resume a DP run with another sampling rate or delta (the run has q = "
                            f"{state['sample_rate']:.4g}, delta = {state['delta']:.3g}; now {self.sample_rate:.4g}, "
                            f"{self.delta:.3g})")
        self.noise_multiplier = self.optimizer.noise_multiplier = state["noise_multiplier"]
        self.budget_steps = state["budget_steps"]

    # ------------------------------------------------------------------------------------------
    # a step

    def step(self, step: int, loss_fn: Callable, to_device: Callable) -> float:
        """One noisy optimizer step over a Poisson-sampled batch; the mean loss of its examples (NaN if none)."""
        picks = np.flatnonzero(self.sampler.random(self.examples) < self.sample_rate)
        parts = [picks[i:i + self.rows] for i in range(0, len(picks), self.rows)]
        if not parts:  # nobody drawn: the step is noise alone
            for p in self.optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            self.optimizer.step()
            return math.nan
        total = 0.0
        for i, part in enumerate(parts):
            batch = to_device(self.batches.select([int(j) for j in part], step, i))
            with self.per_example_loss():
                loss = loss_fn(self.module, batch)
            with warnings.catch_warnings():  # Opacus's hook on the first layer, whose input (ids) has no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            if not self.checked:
                self.check_per_example_gradients(len(part))
            total += loss.item() * len(part)
            last = i == len(parts) - 1
            if not last:  # clip and sum this micro-batch's gradients; the noisy step comes with the last one
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            if not last:
                self.optimizer.zero_grad(set_to_none=True)
        return total / len(picks)

    @contextlib.contextmanager
    def per_example_loss(self) -> Iterator[None]:
        """lmforge models' losses per example (through the head module) for the training pass only: evaluation
        keeps the usual token-mean loss, comparable with non-private runs."""
        models = [m for m in self.model.modules() if isinstance(m, LanguageModel)]
        for m in models:
            m.per_example_loss = True
        try:
            yield
        finally:
            for m in models:
                m.per_example_loss = False

    def check_per_example_gradients(self, rows: int) -> None:
        """Each trained parameter's per-example gradients must add up to its gradient (see the module docstring)."""
        wrong = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad or p.grad is None:
                continue
            sample = getattr(p, "grad_sample", None)
            if isinstance(sample, list):
                sample = sample[-1]
            if sample is None:
                wrong.append(f"{name} (no per-example gradient)")
                continue
            summed = sample.sum(dim=0) / rows  # loss_reduction "mean": Opacus scales each by the rows
            scale = p.grad.abs().max().item()
            if not torch.allclose(summed, p.grad, rtol=1e-3, atol=1e-4 * scale + 1e-8):
                wrong.append(f"{name} (per-example gradients add up to {summed.norm():.4g}, its gradient is "
                             f"{p.grad.norm():.4g})")
        if wrong:
            raise UserError(f"train.dp.epsilon: Opacus cannot give correct per-example gradients for "
                            f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}: the parameter is used "
                            f"outside its module's forward; freeze it (e.g. --method lora) or train without DP")
        self.checked = True
