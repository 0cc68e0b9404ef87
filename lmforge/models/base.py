"""What every model kind shares: the output head and its loss, a KV cache, the parameter count, the two stacks.

    class Decoder(LanguageModel): ...        # Decoder, Seq2Seq and VAE all derive from LanguageModel
    self.head = make_head(config, self.tok_emb)   # nn.Linear (vocab x d_model), tied or not
    out = model.output(h, targets)           # logits, last-position logits or the fused loss
    cache = model.new_cache(batch_size)      # a KVCache in the model's device and dtype
    model.num_parameters(exclude_embeddings=True)
    x = encode_stack(model, model.tok_emb, ids, mask, "text")   # Seq2Seq / VAE: the bidirectional encoder
    h = decode_stack(model, ids, cache)                          # every kind: the causal decoder

`LanguageModel` only reads attributes each model sets in its constructor: `config`, `tok_emb` and
`head`. With tied embeddings the head's weight is the token embedding's own Parameter; the state
dict then holds it once, as `tok_emb.weight` (the head's key is left out on saving and filled in on
loading, so checkpoints keep the same keys either way).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.models.layers import KVCache, causal_positions_and_mask, fused_linear_cross_entropy, key_padding_mask


def make_head(config: ModelConfig, tok_emb: nn.Embedding) -> nn.Linear:
    """The output head d_model -> vocab (no bias); with `tie_embeddings`, its weight is `tok_emb`'s Parameter."""
    if not config.tie_embeddings:
        return nn.Linear(config.d_model, config.vocab_size, bias=False)
    head = nn.Linear(config.d_model, config.vocab_size, bias=False, device="meta")  # no memory, no random draws
    head.weight = tok_emb.weight
    return head


class LanguageModel(nn.Module):
    """The base of every model kind (`config`, `tok_emb`, `head` are set by the subclass)."""

    # the output head's loss, (h (N, d), weight (V, d), targets (N,)) -> mean cross-entropy: a hook
    # that lmforge.kernels may wrap (e.g. to compute in fp32 where that is faster)
    linear_cross_entropy = staticmethod(fused_linear_cross_entropy)

    def __init__(self) -> None:
        super().__init__()
        self.activation_checkpointing = False  # set by the Trainer (train.activation_checkpointing)
        self.register_state_dict_post_hook(_leave_out_tied_head)
        self.register_load_state_dict_pre_hook(_fill_in_tied_head)
        self.register_load_state_dict_post_hook(_tie_head)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's weight (vocab, d_model): the token embedding's when the embeddings are tied."""
        return self.head.weight

    def output(self, h: torch.Tensor, targets: torch.Tensor | None = None, last_only: bool = False,
               ignore_index: int = -100) -> torch.Tensor:
        """The output head over final hidden states h (B, T, d_model), for every model kind.

        Logits (B, T, vocab); with `last_only`, the last position's (B, 1, vocab); with `targets` (B, T),
        the mean cross-entropy, fused with the head (`fused_linear_cross_entropy`: the full logits are
        never made; targets equal to `ignore_index` do not count).
        """
        if targets is not None:
            return self.linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.flatten(),
                                             ignore_index=ignore_index)
        return self.head(h[:, -1:] if last_only else h)

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


def _leave_out_tied_head(model: LanguageModel, state_dict, prefix: str, local_metadata) -> None:
    if model.config.tie_embeddings:
        state_dict.pop(prefix + "head.weight", None)


def _fill_in_tied_head(model: LanguageModel, state_dict, prefix: str, *args) -> None:
    if model.config.tie_embeddings and prefix + "tok_emb.weight" in state_dict:
        state_dict.setdefault(prefix + "head.weight", state_dict[prefix + "tok_emb.weight"])


def _tie_head(model: LanguageModel, incompatible_keys) -> None:
    if model.config.tie_embeddings:  # loading with assign=True puts a new Parameter in each module
        model.head.weight = model.tok_emb.weight


def encode_stack(model: nn.Module, embedding: nn.Embedding, ids: torch.Tensor, mask: torch.Tensor | None,
                 what: str = "source") -> torch.Tensor:
    """The encoder's normalised output (B, S, d_model) for ids (B, S) of a Seq2Seq or VAE `model`.

    Its bidirectional blocks (`model.encoder`) never attend to the positions where `mask` (B, S) is False
    (None: every position is real). `what` names the input in the too-long error.
    """
    S = ids.shape[1]
    if S > model.config.block_size:
        raise ValueError(f"{what} of {S} tokens exceeds the context of {model.config.block_size}")
    positions = torch.arange(S, device=ids.device)[None]  # (1, S)
    x = embedding(ids)  # (B, S, d_model)
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
    and recomputes its activations in the backward pass (`torch.utils.checkpoint`).
    """
    B, T = ids.shape
    start = cache.length if cache is not None else 0
    if start + T > model.config.block_size:
        raise ValueError(f"sequence of {start + T} tokens exceeds the context of {model.config.block_size}")
    positions, mask = causal_positions_and_mask(start, T, cache.pad if cache is not None else None, ids.device)
    x = model.tok_emb(ids)  # (B, T, d_model)
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
