"""The optimizer and learning-rate schedule the Trainer steps with.

    optimizer = build_optimizer(names, params, config, fused=True)   # AdamW, or Muon + AdamW
    lr = lr_at(step, config)                                         # the schedule's peak-relative value

`train.optimizer adamw`: AdamW on everything, weight decay on matrices only. `train.optimizer muon`:
as in modded-nanogpt's speedrun, `torch.optim.Muon` (momentum, then the update orthogonalised by a
Newton-Schulz iteration) on the 2-D weight matrices of the hidden layers, at its own peak rate
`train.muon_lr`, and AdamW at `train.lr` on what Muon is not made for: embeddings, the output head,
norm gains and biases. Both follow the same schedule; their state saves and loads as one.

Schedules: `cosine` (linear warmup, cosine decay to `min_lr` at `max_steps`) or `wsd` (warmup,
stable at the peak, then a linear warm-down to `min_lr` over the last `decay_fraction` of the run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lmforge.config import TrainConfig

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
NOT_FOR_MUON = ("emb", "lm_head", "head.")  # names of the matrices AdamW keeps under muon


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of AdamW at optimizer `step` (Muon's is `muon_lr / lr` times it)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "wsd":
        decay_start = config.max_steps - config.decay_fraction * config.max_steps
        progress = max(0.0, step - decay_start) / max(1.0, config.max_steps - decay_start)
        return config.lr - min(progress, 1.0) * (config.lr - config.min_lr)
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - config.min_lr)


def param_groups(params: Sequence[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (embeddings, linear weights); none on biases and norm gains."""
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def for_muon(name: str, param: torch.Tensor) -> bool:
    """Whether Muon updates this parameter: a 2-D matrix of a hidden layer (not an embedding or head)."""
    return param.dim() == 2 and not any(part in name for part in NOT_FOR_MUON)


class Optimizers:
    """Several optimizers stepped as one: their `param_groups` in one list (each group may carry an
    `lr_scale` relative to the schedule), one `step`, one `zero_grad`, one state dict."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups of every optimizer, live (`load_state_dict` replaces an optimizer's groups)."""
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def step(self, closure: Any = None) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def build_optimizer(names: Sequence[str], params: Sequence[torch.Tensor], config: TrainConfig,
                    fused: bool = False) -> torch.optim.Optimizer | Optimizers:
    """The optimizer of `config.optimizer` over the trainable `params` (named by `names`, same order)."""
    adamw = dict(lr=config.lr, betas=(config.beta1, config.beta2), fused=fused)
    muon = [p for name, p in zip(names, params, strict=True) if for_muon(name, p)] if config.optimizer == "muon" else []
    if not muon:  # adamw, or a model with no hidden matrices
        return torch.optim.AdamW(param_groups(params, config.weight_decay), **adamw)
    chosen = {id(p) for p in muon}
    rest = [p for p in params if id(p) not in chosen]
    matrices = torch.optim.Muon(muon, lr=config.muon_lr, weight_decay=config.weight_decay, momentum=0.95)
    for group in matrices.param_groups:
        group["lr_scale"] = config.muon_lr / config.lr
    return Optimizers(adamw=torch.optim.AdamW(param_groups(rest, config.weight_decay), **adamw), muon=matrices)
