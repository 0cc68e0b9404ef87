"""The decoder-only causal language model: GPT-2 style or Llama style, chosen by `ModelConfig`.

    model = Decoder(preset("gpt-mini"))
    logits = model(ids)                 # (B, T, vocab)
    loss = model(ids, targets)          # mean cross-entropy, fused with the output head
    texts = model.generate("ROMEO:")    # the one generate loop, lmforge.infer.generate

GPT-2 style: learned positions, LayerNorm, GELU, tied embeddings. Llama style: RoPE, RMSNorm,
SwiGLU, grouped-query attention. Both are the same class; the config switches pick the parts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.infer.generate import generate
from lmforge.models.base import LanguageModel, make_head
from lmforge.models.layers import Block, KVCache, RotaryEmbedding, decode_stack, init_weights, make_norm


class Decoder(LanguageModel):
    """Token ids in, next-token logits out; `tokenizer` is attached by `lmforge.load`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model) if config.position == "learned" else None
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta) if config.position == "rope" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.head = make_head(config, self.tok_emb)
        self.tokenizer: Any = None
        init_weights(self, config.n_layer)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, T, d_model) for token ids (B, T)."""
        return decode_stack(self, ids, cache)

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        ignore_index: int = -100,
        token_logprobs: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); or, given `targets` (B, T), the mean next-token cross-entropy.

        With targets the output head and the loss are fused (the full logits are never made);
        targets equal to `ignore_index` do not count. `last_only` returns logits (B, 1, vocab);
        `token_logprobs` (with targets) each target's log-probability (B, T), 0 where ignored.
        """
        return self.output(self.hidden_states(ids, cache), targets, last_only, ignore_index, token_logprobs)

    def generate(self, *args: Any, **kwargs: Any) -> list[str]:
        """Continuations of the prompt(s): the options and the output are those of `lmforge.infer.generate.generate`."""
        return generate(self, *args, **kwargs)


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul parameters + attention (PaLM appendix B)."""
    d, L = config.d_model, config.n_layer
    kv = config.n_kv_head * config.head_dim
    ffn = (3 if config.mlp == "swiglu" else 2) * d * config.d_ff
    matmul_params = L * (d * (d + 2 * kv) + d * d + ffn) + d * config.vocab_size
    T = seq_len or config.block_size
    attention = 6 * L * d * T  # 12 * L * d * T / 2: causal attention does half the work
    return 6 * matmul_params + attention
