"""What every model kind shares: the output head and its loss, a KV cache, the parameter count.

    class Decoder(LanguageModel): ...        # Decoder, Seq2Seq and VAE all derive from LanguageModel
    self.head = make_head(config, self.tok_emb)   # nn.Linear (vocab x d_model), tied or not
    out = model.output(h, targets)           # logits, last-position logits or the fused loss
    cache = model.new_cache(batch_size)      # a KVCache in the model's device and dtype
    model.num_parameters(exclude_embeddings=True)

`LanguageModel` only reads attributes each model sets in its constructor: `config`, `tok_emb` and
`head`. With tied embeddings the head's weight is the token embedding's own Parameter; the state
dict then holds it once, as `tok_emb.weight` (the head's key is left out on saving and filled in on
loading, so checkpoints keep the same keys either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.layers import KVCache, fused_linear_cross_entropy, fused_linear_logprobs


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
        self.per_example_loss = False  # set by the Trainer under differential privacy (see `output`)
        self.register_state_dict_post_hook(_leave_out_tied_head)
        self.register_load_state_dict_pre_hook(_fill_in_tied_head)
        self.register_load_state_dict_post_hook(_tie_head)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's weight (vocab, d_model): the token embedding's when the embeddings are tied."""
        return self.head.weight

    def output(self, h: torch.Tensor, targets: torch.Tensor | None = None, last_only: bool = False,
               ignore_index: int = -100, token_logprobs: bool = False) -> torch.Tensor:
        """The output head over final hidden states h (B, T, d_model), for every model kind.

        Logits (B, T, vocab); with `last_only`, the last position's (B, 1, vocab); with `targets` (B, T),
        the mean cross-entropy, fused with the head (`fused_linear_cross_entropy`: the full logits are
        never made; targets equal to `ignore_index` do not count); with `token_logprobs` too, each target's
        log-probability (B, T) in fp32, 0 where ignored (only those positions go through the head).
        With `per_example_loss` (differential privacy) the loss is the mean over rows of each row's mean token
        loss, made through the head module (full logits), so each row's gradient is its own.
        """
        if targets is not None and token_logprobs:
            scored = targets != ignore_index
            out = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
            out[scored] = fused_linear_logprobs(h[scored], self.head.weight, targets[scored])
            return out
        if targets is not None and self.per_example_loss:
            # differential privacy needs each example's own gradient (Opacus hooks the head module): logits
            # through the head, the loss the mean over examples of each one's mean token loss
            logits = self.head(h).float()  # (B, T, V)
            losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
            counted = (targets != ignore_index).sum(dim=1).clamp(min=1)
            return (losses.sum(dim=1) / counted).mean()
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


def _tied(model: LanguageModel) -> bool:
    """Whether the head is the token embedding's (not where a quantized layer has replaced it)."""
    return model.config.tie_embeddings and isinstance(model.head, nn.Linear)


def _leave_out_tied_head(model: LanguageModel, state_dict, prefix: str, local_metadata) -> None:
    if _tied(model):
        state_dict.pop(prefix + "head.weight", None)


def _fill_in_tied_head(model: LanguageModel, state_dict, prefix: str, *args) -> None:
    if _tied(model) and prefix + "tok_emb.weight" in state_dict:
        state_dict.setdefault(prefix + "head.weight", state_dict[prefix + "tok_emb.weight"])


def _tie_head(model: LanguageModel, incompatible_keys) -> None:
    if _tied(model):  # loading with assign=True puts a new Parameter in each module
        model.head.weight = model.tok_emb.weight
