"""The variational autoencoder language model (`kind: vae`): text -> (mu, log sigma^2) -> z -> text.

    model = VAE(ModelConfig(kind="vae", vocab_size=384, block_size=64, n_layer=2, n_head=2, d_model=64))
    mu, logvar = model.encode(ids, mask)                 # q(z | x): a diagonal Gaussian per text
    z = model.reparameterize(mu, logvar)                 # z = mu + sigma * eps, differentiable
    loss = model(ids, targets, z=z)                      # reconstruction cross-entropy of p(x | z)
    logits = model(ids, z=z)                             # (B, T, vocab)
    texts = model.generate(num_samples=3, seed=0)        # decoded from z ~ N(0, I) (lmforge.tasks.vae: more)

The encoder is a stack of bidirectional `Block`s (the same layers as the decoder, `causal=False`, padding
masked out), mean-pooled over the real tokens and projected to (mu, log sigma^2) of `latent_dim`
dimensions. The decoder is a causal stack of the same blocks that starts from the end-of-text token.

How the decoder is conditioned on z: a projection of z is added to the embedding of every decoder
input token. Chosen over a prefix token (x-transformers' gpt_vae) or cross-attention memory because
z then reaches every position directly through the residual stream, at every step, instead of through
one attention slot that a strong autoregressive decoder learns to ignore (the route to posterior
collapse); it costs no context position, and cached generation needs nothing but z in the cache
(`cache.condition["z"]`, put there by `generation_batches`), so sampling goes through the one generate
loop unchanged.
The objective (ELBO with beta annealing and free bits) is `lmforge.train.objectives.ElboLoss`.

`ConditionalVAE` (`kind: cvae`) is the article's summarization case: a Seq2Seq whose decoder also
reads a latent z, with a learned prior p(z | article) and a posterior q(z | article, summary).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.infer import batches, continuation_prompts
from lmforge.infer.generate import generate
from lmforge.models.base import LanguageModel, make_head
from lmforge.models.layers import (
    Block,
    KVCache,
    RotaryEmbedding,
    decode_stack,
    encode_stack,
    init_weights,
    make_norm,
    masked_mean,
)
from lmforge.models.seq2seq import Seq2Seq


class VAE(LanguageModel):
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
        self.head = make_head(config, self.tok_emb)
        self.tokenizer: Any = None
        init_weights(self, config.n_layer)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and log sigma^2 (B, latent_dim) of q(z | x) for ids (B, S); `mask` (B, S) is True at real tokens."""
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        pooled = masked_mean(encode_stack(self, self.tok_emb, ids, mask, "text"), mask)
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
        return decode_stack(self, ids, cache, offset=self.from_latent(z.to(self.from_latent.weight.dtype)))

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        ignore_index: int = -100,
        z: torch.Tensor | None = None,
        source: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) of p(x | z), z given or read from `cache`; with `targets`, the mean cross-entropy.

        With `source` (the text to encode, and its mask), z is drawn from q(z | source) and the result is
        (logits or loss, mu, logvar): the whole ELBO pass in one call, as DistributedDataParallel needs.
        """
        mu = logvar = None
        if source is not None:
            mu, logvar = self.encode(source, source_mask)
            z = self.reparameterize(mu, logvar) if z is None else z
        if z is None:
            if cache is None or "z" not in cache.condition:
                raise ValueError("the VAE decoder needs a latent: pass z= (or a cache holding it)")
            z = cache.condition["z"]
        out = self.output(self.hidden_states(ids, z, cache), targets, last_only, ignore_index)
        return out if mu is None else (out, mu, logvar)

    def generate(
        self,
        prompt: str | Sequence[str] = "",
        max_new_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        num_samples: int = 1,
        seed: int | None = None,
        stream: Callable[[str], None] | bool | None = None,
    ) -> list[str]:
        """Texts decoded from z drawn from the prior N(0, I), one z per sample, continuing each `prompt`.

        The options and the output are those of the decoder's `generate` (`lmforge.infer.generate.generate`,
        which does the work; so `lmforge generate` works); `seed` fixes the draws of z (and of the tokens
        when sampling).
        """
        return generate(self, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop,
                        num_samples, seed, stream)

    def generation_batches(self, texts: Sequence[str], tokenizer: Any, batch_size: int | None, seed: int | None
                           ) -> Iterator[tuple[list[list[int]], dict[str, torch.Tensor]]]:
        """What the generate loop decodes from (`lmforge.infer`): each text after the end-of-text
        token the decoder starts from, and one z per text drawn from the prior (from `seed` when given)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None  # None: fresh draws
        z = torch.randn(len(texts), self.config.latent_dim, generator=generator).to(self.head_weight.device)
        prompts = continuation_prompts(texts, tokenizer, start=[tokenizer.eos_id])
        for rows in batches(range(len(texts)), batch_size):  # ranges of row indices
            yield prompts[rows.start:rows.stop], {"z": z[rows.start:rows.stop]}


class ConditionalVAE(Seq2Seq):
    """The conditional VAE of the article's summarization case (`kind: cvae`): a Seq2Seq with a latent z.

        mu_p, logvar_p = model.prior(memory, source_mask)                 # p(z | article)
        mu_q, logvar_q = model.posterior(memory, source_mask, summary, summary_mask)  # q(z | article, summary)
        loss = model(ids, targets, source=article, source_mask=mask, z=z) # -log p(summary | article, z) per token
        texts = model.generate(articles, condition_options={"z_seed": 1})  # one z drawn from the prior

    The article is encoded once (the Seq2Seq encoder); the summary goes through the same encoder. The prior
    reads the article's mean-pooled encoding, the posterior the article's and the summary's side by side.
    The decoder is the Seq2Seq decoder (cross-attention to the article) with z added to every input
    embedding, as in `VAE`. Trained on the ELBO with KL(q || p) (`ConditionalElboLoss`). Generation uses
    the prior's mean unless `z_seed` asks for a draw; different draws give different summaries.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        d, D = config.d_model, config.latent_dim
        self.to_prior = nn.Linear(d, 2 * D)
        self.to_posterior = nn.Linear(2 * d, 2 * D)
        self.from_latent = nn.Linear(D, d)
        init_weights(self, config.n_layer)

    def prior(self, memory: torch.Tensor, source_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """mu, logvar (B, latent_dim) of p(z | article), from the article's encoding."""
        mu, logvar = self.to_prior(masked_mean(memory, source_mask)).float().chunk(2, dim=-1)
        return mu, logvar

    def posterior(self, memory: torch.Tensor, source_mask: torch.Tensor | None, target: torch.Tensor,
                  target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu, logvar of q(z | article, summary): the pooled article and the pooled encoded summary."""
        summary = masked_mean(self.encode(target, target_mask), target_mask)
        pooled = torch.cat([masked_mean(memory, source_mask), summary], dim=-1)
        mu, logvar = self.to_posterior(pooled).float().chunk(2, dim=-1)
        return mu, logvar

    def condition(self, source: torch.Tensor, source_mask: torch.Tensor | None = None,
                  z_seed: int | None = None) -> dict[str, torch.Tensor]:
        """The encoder's output, its mask, and z: the prior's mean, or a draw from the prior with `z_seed`."""
        condition = super().condition(source, source_mask)
        mu, logvar = self.prior(condition["memory"], condition["memory_mask"])
        if z_seed is None:
            condition["z"] = mu
        else:
            generator = torch.Generator(device=mu.device).manual_seed(z_seed)
            condition["z"] = self.reparameterize(mu, logvar, generator)
        return condition

    reparameterize = staticmethod(VAE.reparameterize)

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        ignore_index: int = -100,
        source: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        posterior_target: torch.Tensor | None = None,
        posterior_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """As `Seq2Seq.forward`, given z (B, latent_dim) or with z in the cache (then the prior's if absent).

        With `posterior_target` (the summary ids, and its mask; training), z is drawn from q(z | article,
        summary) and the result is (logits or loss, mu, logvar, prior_mu, prior_logvar): the whole ELBO
        pass in one call, as DistributedDataParallel needs.
        """
        if source is not None:
            memory, memory_mask = self.encode(source, source_mask), source_mask
        elif cache is not None and "memory" in cache.condition:
            memory, memory_mask = cache.condition["memory"], cache.condition["memory_mask"]
        else:
            raise ValueError("ConditionalVAE needs a source: pass source= (or a cache holding the encoder's output)")
        stats: tuple[torch.Tensor, ...] = ()
        if posterior_target is not None:
            prior_mu, prior_logvar = self.prior(memory, memory_mask)
            mu, logvar = self.posterior(memory, memory_mask, posterior_target, posterior_mask)
            z = self.reparameterize(mu, logvar) if z is None else z
            stats = (mu, logvar, prior_mu, prior_logvar)
        if z is None:
            z = cache.condition["z"] if cache is not None and "z" in cache.condition else \
                self.prior(memory, memory_mask)[0]
        offset = self.from_latent(z.to(self.from_latent.weight.dtype))
        h = self.hidden_states(ids, memory, memory_mask, cache, offset)
        out = self.output(h, targets, last_only, ignore_index)
        return (out, *stats) if stats else out
