"""The encoder-decoder model (`kind: seq2seq`): a bidirectional encoder, a causal decoder with cross-attention.

    model = Seq2Seq(ModelConfig(kind="seq2seq", vocab_size=384, block_size=64, n_layer=2, n_head=2, d_model=64))
    loss = model(ids, targets, source=source, source_mask=source_mask)   # mean cross-entropy of the targets
    logits = model(ids, source=source, source_mask=source_mask)          # (B, T, vocab)
    texts = model.generate(["a source text"], beam_size=4)               # tokenizer attached by lmforge.load

Both halves are built of the same `Block` as the decoder-only model: the encoder's blocks attend both
ways and never to padding (`key_padding_mask`); the decoder's blocks are causal and add a
cross-attention sublayer over the encoder's output (`memory`). The decoder starts from the
end-of-text token and learns to end its output with it, so one token id does both jobs.
`share_embeddings` (default) lets the encoder and decoder use one token embedding (one tokenizer for
both sides); otherwise the encoder has its own (`src_emb`). The output head is tied to the decoder's
embedding when `tie_embeddings`.

Generation goes through the one generate loop (`lmforge.infer.generate.generate`, beam search
included): `generation_batches` encodes each batch of sources once, its output rides in the KV cache
(`cache.condition`), and each decoder layer makes the cross-attention keys and values once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.infer import batches, pad_right
from lmforge.infer.generate import generate
from lmforge.models.base import LanguageModel, make_head
from lmforge.models.layers import Block, KVCache, RotaryEmbedding, decode_stack, encode_stack, init_weights, make_norm

TOO_LONG = ("truncate", "error")


class Seq2Seq(LanguageModel):
    """Source ids and target ids in, next-target-token logits out; `tokenizer` is attached by `lmforge.load`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        d, learned = config.d_model, config.position == "learned"
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.src_emb = None if config.share_embeddings else nn.Embedding(config.vocab_size, d)
        self.enc_pos_emb = nn.Embedding(config.block_size, d) if learned else None
        self.pos_emb = nn.Embedding(config.block_size, d) if learned else None
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta) if config.position == "rope" else None
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config, i) for i in range(config.encoder_layers))
        self.enc_norm = make_norm(config)
        self.blocks = nn.ModuleList(Block(config, i, cross_attention=True) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.head = make_head(config, self.tok_emb)
        self.tokenizer: Any = None
        init_weights(self, config.n_layer)

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, d_model) for source ids (B, S); `source_mask` (B, S) is True at real tokens."""
        return encode_stack(self, self.src_emb or self.tok_emb, source, source_mask, "source")

    def condition(self, source: torch.Tensor, source_mask: torch.Tensor | None = None, **options: Any
                  ) -> dict[str, torch.Tensor]:
        """What generation carries in the cache: the encoder's output and which of its positions are real.

        A plain Seq2Seq takes no conditioning `options` (a conditional VAE's `z_seed`): given any, a UserError.
        """
        if options:
            raise UserError(f"{', '.join(options)} needs a conditional VAE (kind cvae); this model is kind "
                            f"{self.config.kind}")
        if source_mask is None:
            source_mask = torch.ones(source.shape, dtype=torch.bool, device=source.device)
        return {"memory": self.encode(source, source_mask), "memory_mask": source_mask}

    def hidden_states(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                      cache: KVCache | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's final normalised hidden states (B, T, d_model) for target-side ids (B, T).

        `offset` (B, d_model) is added to every input embedding (how a conditional VAE's z comes in).
        """
        return decode_stack(self, ids, cache, offset, memory, memory_mask)

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        ignore_index: int = -100,
        source: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) of the decoder over `ids`, given `source` (or the encoder output in `cache`).

        With `targets` (B, T): the mean cross-entropy (targets equal to `ignore_index` do not count).
        """
        if source is not None:
            memory, memory_mask = self.encode(source, source_mask), source_mask
        elif cache is not None and "memory" in cache.condition:
            memory, memory_mask = cache.condition["memory"], cache.condition["memory_mask"]
        else:
            raise ValueError("Seq2Seq needs a source: pass source= (or a cache holding the encoder's output)")
        h = self.hidden_states(ids, memory, memory_mask, cache)
        return self.output(h, targets, last_only, ignore_index)

    def generate(
        self,
        sources: str | Sequence[str],
        max_new_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool = True,
        seed: int | None = None,
        too_long: str = "truncate",
        batch_size: int = 32,
        condition_options: dict[str, Any] | None = None,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        num_samples: int = 1,
        stream: Callable[[str], None] | bool | None = None,
    ) -> list[str]:
        """The output text for each source text: greedy (temperature 0, the default), sampled, or beam search.

        `beam_size` > 1 searches (temperature, top_k, top_p and repetition_penalty then do not apply).
        Sources longer than the context are cut with a warning (`too_long="truncate"`) or rejected
        (`"error"`). `condition_options` go to `self.condition` (a conditional VAE: `{"z_seed": 3}` samples
        z). The other options, `stop`, `num_samples` (outputs per source) and `stream` among them, and the
        output are those of the decoder's `generate` (`lmforge.infer.generate.generate`, which does the
        work, `batch_size` sources at a time), so `lmforge generate` works.
        """
        return generate(self, sources, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop,
                        num_samples, seed, stream, beam_size=beam_size, length_penalty=length_penalty,
                        early_stopping=early_stopping, batch_size=batch_size, too_long=too_long,
                        condition_options=condition_options)

    def generation_batches(self, texts: Sequence[str], tokenizer: Any, batch_size: int | None, seed: int | None,
                           too_long: str = "truncate", condition_options: dict[str, Any] | None = None
                           ) -> Iterator[tuple[list[list[int]], dict[str, torch.Tensor]]]:
        """What the generate loop decodes from (`lmforge.infer`): each batch of source texts
        encoded once (its output the condition), and the decoder starting from the end-of-text token."""
        sources = encode_texts(texts, tokenizer, self.config.block_size, too_long, "source")
        for batch in batches(sources, batch_size):
            source, source_mask = pad_right(batch, tokenizer.eos_id, self.head_weight.device)
            yield [[tokenizer.eos_id]] * len(batch), self.condition(source, source_mask, **(condition_options or {}))


def encode_texts(texts: Sequence[str], tokenizer, max_tokens: int, too_long: str = "truncate",
                 what: str = "source") -> list[list[int]]:
    """Token ids of each text, at most `max_tokens`: longer ones are cut with a warning, or rejected.

    Empty texts are a UserError naming the item (`what` says which side: source, target, text).
    """
    if too_long not in TOO_LONG:
        raise UserError(f"too_long = {too_long!r}; expected one of {', '.join(TOO_LONG)}")
    encoded, cut = [], 0
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{what} {i + 1} is {'empty' if isinstance(text, str) else type(text).__name__}; "
                            f"expected non-empty text")
        ids = tokenizer.encode(text)
        if len(ids) > max_tokens:
            if too_long == "error":
                raise UserError(f"{what} {i + 1} is {len(ids)} tokens; the model's limit here is {max_tokens} "
                                f"(use too_long='truncate' to cut it)")
            ids, cut = ids[:max_tokens], cut + 1
        encoded.append(ids)
    if cut:
        print(f"warning: {cut} of {len(texts)} texts ({what}) are longer than {max_tokens} tokens and were cut",
              file=sys.stderr)
    return encoded
