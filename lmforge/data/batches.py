"""Batches for training on a list of examples, and the one rule that holds examples out for validation.

    train, val = hold_out(examples, 0.1, seed=0)
    batches = EpochBatches(train, batch_size=8, seed=1337, collate=lambda items, step, part: {...})
    batch = batches(step, part, rows)        # what the Trainer asks for

The batch of a step depends only on (seed, step), so a resumed run draws exactly the batches an
uninterrupted one would. Token shards for pretraining are sampled by `RandomWindows`
(`lmforge.train.objectives`), and a corpus is split into whole documents by `split_documents`
(`lmforge.data.shards`): text from one play or book never lands on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from lmforge.errors import UserError

T = TypeVar("T")


def hold_out(items: Sequence[T], fraction: float, seed: int = 0, what: str = "example") -> tuple[list[T], list[T]]:
    """A fixed random share of `items` for validation (at least one), the rest for training."""
    if len(items) < 2:
        raise UserError(f"only {len(items)} {what}(s): need at least 2 to hold one out for validation "
                        f"(or pass --val-data)")
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction = {fraction}; expected a value between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


class EpochBatches:
    """Shuffled epochs of `items`, each batch made by `collate(items, step, part)`.

    Step s belongs to epoch s // steps_per_epoch; each epoch is a new permutation, and the last
    incomplete batch of an epoch is dropped (it is drawn in other epochs). Under data parallelism
    (or gradient accumulation) `part` picks this process's rows of the step's batch.
    """

    def __init__(self, items: Sequence[Any], batch_size: int, seed: int,
                 collate: Callable[[list[Any], int, int], dict[str, Any]]):
        if not items:
            raise UserError("no training examples")
        self.items, self.batch_size, self.seed, self.collate = list(items), batch_size, seed, collate
        self.steps_per_epoch = max(1, len(self.items) // batch_size)

    def __call__(self, step: int, part: int, rows: int) -> dict[str, Any]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        start = index * self.batch_size + part * rows
        picks = [int(order[i % len(order)]) for i in range(start, start + rows)]
        return self.collate([self.items[i] for i in picks], step, part)

    def __len__(self) -> int:
        """The number of training examples (the records differential privacy protects)."""
        return len(self.items)

    def select(self, picks: Sequence[int], step: int, part: int) -> dict[str, Any]:
        """The batch of the examples numbered `picks` (differential privacy's Poisson-sampled batches)."""
        return self.collate([self.items[i] for i in picks], step, part)
