"""The variational autoencoder language model (`kind: vae`): text -> (mu, log sigma^2) -> z -> text.

    model = VAE(ModelConfig(kind="vae", vocab_size=384, block_size=64, n_layer=2, n_head=2, d_model=64))
    mu, logvar = model.encode(ids, mask)                 # q(z | x): a diagonal Gaussian per text
    z = model.reparameterize(mu, logvar)                 # z = mu + sigma * eps, differentiable
    loss = model(ids, targets, z=z)                      # reconstruction cross-entropy of p(x | z)
    logits = model(ids, z=z)                             # (B, T, vocab)

The encoder is a stack of bidirectional `Block`s (the same layers as the decoder, `causal=False`, padding
masked out), mean-pooled over the real tokens and projected to (mu, log sigma^2) of `latent_dim`
dimensions. The decoder is a causal stack of the same blocks that starts from the end-of-text token.

How the decoder is conditioned on z: a projection of z is added to the embedding of every decoder
input token. Chosen over a prefix token (x-transformers' gpt_vae) or cross-attention memory because
z then reaches every position directly through the residual stream, at every step, instead of through
one attention slot that a strong autoregressive decoder learns to ignore (the route to posterior
collapse); it costs no context position, and cached generation needs nothing but z in the cache
(`cache.condition["z"]`), so sampling goes through the one generate loop unchanged.
The objective (ELBO with beta annealing and free bits) is `lmforge.train.objectives.ElboLoss`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.layers import (
    Block,
    KVCache,
    RotaryEmbedding,
    causal_positions_and_mask,
    fused_linear_cross_entropy,
    init_weights,
    key_padding_mask,
    make_norm,
)


class VAE(nn.Module):
    """Encoder to a latent z, decoder from z; `tokenizer` is attached by `lmforge.load`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        d, learned = config.d_model, config.position == "learned"
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.enc_pos_emb = nn.Embedding(config.block_size, d) if learned else None
        self.pos_emb = nn.Embedding(config.block_size, d) if learned else None
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta) if config.position == "rope" else None
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config, i) for i in range(config.encoder_layers))
        self.enc_norm = make_norm(config)
        self.to_latent = nn.Linear(d, 2 * config.latent_dim)  # -> (mu, logvar)
        self.from_latent = nn.Linear(config.latent_dim, d)  # z -> added to each decoder input embedding
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.tokenizer: Any = None
        init_weights(self, config.n_layer)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.head is None else self.head.weight

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and log sigma^2 (B, latent_dim) of q(z | x) for ids (B, S); `mask` (B, S) is True at real tokens."""
        B, S = ids.shape
        if S > self.config.block_size:
            raise ValueError(f"text of {S} tokens exceeds the context of {self.config.block_size}")
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        positions = torch.arange(S, device=ids.device)[None]
        x = self.tok_emb(ids)
        if self.enc_pos_emb is not None:
            x = x + self.enc_pos_emb(positions)
        x = self.dropout(x)
        rope = self.rope.cos_sin(positions, x.dtype) if self.rope is not None else None
        for block in self.encoder:
            x = block(x, rope, mask=key_padding_mask(mask), causal=False)
        x = self.enc_norm(x)
        weights = mask[..., None].to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # mean over the real tokens
        mu, logvar = self.to_latent(pooled).float().chunk(2, dim=-1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I): a sample of q(z | x) that gradients flow through."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + (0.5 * logvar).exp() * eps

    def hidden_states(self, ids: torch.Tensor, z: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The decoder's final normalised hidden states (B, T, d_model) for ids (B, T) given z (B, latent_dim)."""
        B, T = ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        positions, mask = causal_positions_and_mask(start, T, cache.pad if cache is not None else None, ids.device)
        x = self.tok_emb(ids) + self.from_latent(z.to(self.from_latent.weight.dtype))[:, None]
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.dropout(x)
        rope = self.rope.cos_sin(positions, x.dtype) if self.rope is not None else None
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        ignore_index: int = -100,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) of p(x | z), z given or read from `cache`; with `targets`, the mean cross-entropy."""
        if z is None:
            if cache is None or "z" not in cache.condition:
                raise ValueError("the VAE decoder needs a latent: pass z= (or a cache holding it)")
            z = cache.condition["z"]
        h = self.hidden_states(ids, z, cache)
        if targets is not None:
            return fused_linear_cross_entropy(h.flatten(0, 1), self.head_weight, targets.flatten(),
                                              ignore_index=ignore_index)
        if last_only:
            return (self.head_weight @ h[:, -1].T).T.contiguous()[:, None]  # (B, 1, V)
        return h @ self.head_weight.T

    def new_cache(self, batch_size: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, p.dtype, pad)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            for emb in (self.tok_emb, self.enc_pos_emb, self.pos_emb):
                n -= emb.weight.numel() if emb is not None else 0
        return n
