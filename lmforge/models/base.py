"""What every model kind shares: the output head's weight, a KV cache, the parameter count, the encoder stack.

    class Decoder(LanguageModel): ...        # Decoder, Seq2Seq and VAE all derive from LanguageModel
    model.head_weight                        # the output head (the token embedding when tied)
    cache = model.new_cache(batch_size)      # a KVCache in the model's device and dtype
    model.num_parameters(exclude_embeddings=True)
    x = encode_stack(model, model.tok_emb, ids, mask, "text")   # Seq2Seq / VAE: the bidirectional encoder

`LanguageModel` only reads attributes each model sets in its constructor: `config`, `tok_emb` and `head`
(None when the head is tied to `tok_emb`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.layers import KVCache, causal_positions_and_mask, key_padding_mask


class LanguageModel(nn.Module):
    """The base of every model kind (`config`, `tok_emb`, `head` are set by the subclass)."""

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's weight (vocab, d_model): the token embedding's when the embeddings are tied."""
        return self.tok_emb.weight if self.head is None else self.head.weight

    def new_cache(self, batch_size: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        """An empty KV cache of `max_len` positions (default: the context) for `batch_size` rows."""
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, p.dtype, pad)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """The number of parameters; with `exclude_embeddings`, less those of the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n


def encode_stack(model: nn.Module, embedding: nn.Embedding, ids: torch.Tensor, mask: torch.Tensor | None,
                 what: str = "source") -> torch.Tensor:
    """The encoder's normalised output (B, S, d_model) for ids (B, S) of a Seq2Seq or VAE `model`.

    Its bidirectional blocks (`model.encoder`) never attend to the positions where `mask` (B, S) is False
    (None: every position is real). `what` names the input in the too-long error.
    """
    S = ids.shape[1]
    if S > model.config.block_size:
        raise ValueError(f"{what} of {S} tokens exceeds the context of {model.config.block_size}")
    positions = torch.arange(S, device=ids.device)[None]
    x = embedding(ids)
    if model.enc_pos_emb is not None:
        x = x + model.enc_pos_emb(positions)
    x = model.dropout(x)
    rope = model.rope.cos_sin(positions, x.dtype) if model.rope is not None else None
    attn_mask = key_padding_mask(mask) if mask is not None else None
    for block in model.encoder:
        x = block(x, rope, mask=attn_mask, causal=False)
    return model.enc_norm(x)


def decode_stack(model: nn.Module, ids: torch.Tensor, cache: KVCache | None = None, offset: torch.Tensor | None = None,
                 memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The causal decoder's normalised hidden states (B, T, d_model) for ids (B, T) of any model kind.

    `offset` (B, d_model) is added to every input embedding (how a VAE's z comes in); `memory` (B, S,
    d_model) is what cross-attention reads (an encoder's output), never at positions where `memory_mask`
    is False. With `model.activation_checkpointing` set and no cache, each block keeps only its input
    and recomputes its activations in the backward pass.
    """
    B, T = ids.shape
    start = cache.length if cache is not None else 0
    if start + T > model.config.block_size:
        raise ValueError(f"sequence of {start + T} tokens exceeds the context of {model.config.block_size}")
    positions, mask = causal_positions_and_mask(start, T, cache.pad if cache is not None else None, ids.device)
    x = model.tok_emb(ids)
    if offset is not None:
        x = x + offset[:, None]
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions)
    x = model.dropout(x)
    rope = model.rope.cos_sin(positions, x.dtype) if model.rope is not None else None
    cross = {"memory": memory, "memory_mask": key_padding_mask(memory_mask) if memory_mask is not None else None} \
        if memory is not None else {}
    recompute = getattr(model, "activation_checkpointing", False) and torch.is_grad_enabled() and cache is None
    for block in model.blocks:
        x = checkpoint(block, x, rope, None, mask, use_reentrant=False, **cross) if recompute else \
            block(x, rope, cache, mask, **cross)
    if cache is not None:
        cache.length = start + T
    return model.norm(x)
