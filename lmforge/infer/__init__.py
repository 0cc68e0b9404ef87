"""Generation for every model kind, and what it asks of a model.

    lmforge.infer.generate    the one generate loop (sampling, stop strings, streaming), which every
                              model's `generate` calls
    lmforge.infer.beam        beam search, on the same protocol
    lmforge.infer.speculative speculative decoding (a draft model or prompt lookup), which the loop calls
    lmforge.infer (here)      the protocol, and the batches the loop makes of token ids

The generate loop and beam search sit below `lmforge.models` and never import it: any model with
the `Generative` protocol below generates through them (lmforge's Decoder, Seq2Seq, VAE and
ConditionalVAE do; so would another implementation, or a wrapper of one).

    model.config.block_size                         the context length, in tokens
    model.new_cache(batch_size, max_len, pad)       an empty `Cache`; `pad` (B,) counts each row's left padding
    model(ids, cache=cache, last_only=True)         logits (B, 1, vocab) after ids (B, T) follow the cached ones
                                                    (last_only=False: (B, T, vocab), for speculative decoding)
    model.parameters()                              (an nn.Module's) the device the batches go to

A conditioned model (seq2seq: the encoder's output of a source text; vae: a latent z) reads its
condition from `cache.condition`, one row per sequence, and may tell the loop how texts become
prompts and conditions with one optional method (the `Conditioned` protocol):

    model.generation_batches(texts, tokenizer, batch_size, seed, **options)
        -> iterable of (prompts: list of token-id lists, condition: dict of (B, ...) tensors or None)

A model without it continues each text (`continuation_prompts`), all in one batch unless
`batch_size` says otherwise.

    tokens, pad = left_pad([[5, 6, 7], [8]], "cpu")      # (2, 3) and (2,): the batch generation starts from
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)     # (2, 3) and its True-at-real-tokens mask

What a sampling step draws from, the same for the loop and for speculative decoding (whose draft and
target distributions must be shaped alike): `apply_repetition_penalty`, then `warp_logits`
(temperature, top-k, top-p), then softmax.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch


class Cache(Protocol):
    """The KV cache the loop keeps between steps (lmforge.models.layers.KVCache is one)."""

    length: int  # positions already stored
    max_len: int  # positions it can hold
    condition: dict[str, torch.Tensor]  # what a conditioned model reads at every step, one row per sequence

    def select(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows, in this order (beam search reorders its beams)."""


class Generative(Protocol):
    """A model the loop can generate with (see the module docstring)."""

    config: Any  # has block_size

    def new_cache(self, batch_size: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> Cache: ...

    def __call__(self, ids: torch.Tensor, *, cache: Cache, last_only: bool) -> torch.Tensor: ...

    def parameters(self) -> Iterable[torch.nn.Parameter]: ...


class Conditioned(Protocol):
    """A model whose generation starts from a condition made of each text (see the module docstring)."""

    def generation_batches(self, texts: Sequence[str], tokenizer: Any, batch_size: int | None, seed: int | None,
                           **options: Any) -> Iterable[tuple[list[list[int]], dict[str, torch.Tensor] | None]]: ...


def model_device(model: Generative) -> torch.device:
    """The device of the model's weights, where the loop puts its batches (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def continuation_prompts(texts: Sequence[str], tokenizer: Any, start: Sequence[int] = ()) -> list[list[int]]:
    """The token ids of each text after `start`; an empty text is the end-of-text token (an unconditional start)."""
    return [list(start) + tokenizer.encode(text) if text else [tokenizer.eos_id] for text in texts]


def batches(items: Sequence, batch_size: int | None) -> Iterable[Sequence]:
    """`items` in slices of `batch_size` (None: all in one)."""
    size = batch_size or max(len(items), 1)
    return (items[i:i + size] for i in range(0, len(items), size))


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of token ids left-padded into one batch (B, T), and the number of padding tokens (B,) of each row.

    The padding id is 0; the KV cache's `pad` keeps it out of attention and positions.
    """
    longest = max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    return tokens, pad


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (B, S) right-padded with `pad_id`, and the mask (B, S) that is True at real tokens, on `device`
    (filled on the CPU, then moved in one copy each)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), length), dtype=torch.bool, device="cpu")
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
        mask[i, :len(r)] = True
    return ids.to(device), mask.to(device)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as in transformers): shrink the logits of tokens already in `seen` (B, S)."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, seen, scores)


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """The fp32 logits (B, V) that sampling draws from (softmax of them): divided by `temperature` (> 0),
    with -inf outside the `top_k` most likely tokens and outside the nucleus of probability `top_p`."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits
