"""Speculative decoding: a cheap drafter proposes several tokens, the model checks them in one pass.

    ids = generate_ids(model, [prompt], max_new_tokens=60, temperature=0, draft="prompt-lookup")
    texts = generate(model, "Summarize: ...", draft=small_model, draft_tokens=4, stats=stats)
    stats["accepted"] / stats["drafted"]          # the acceptance rate; stats["passes"]: the model's forward passes

The generate loop (`lmforge.infer.generate`) dispatches here when it is given a `draft`; the options
(temperature, top-k, top-p, repetition penalty, end-of-text, stop strings, streaming) are the loop's
own. Each round:
1. the drafter proposes up to `draft_tokens` tokens: a smaller model with the same tokenizer
   (sampled from, with its own KV cache), or `"prompt-lookup"`: the tokens that followed the earliest
   earlier occurrence of the sequence's last 3 (else 2, else 1) tokens (no second model; strong where
   the output copies the prompt: summaries, edits);
2. the model reads the pending token and the K drafts in one forward pass (logits at every position);
3. greedy (temperature 0): drafts are kept while they equal the model's argmax, then the model's own
   token follows, so the output is the model's greedy output token for token. Sampling: draft x with
   draft probability q(x) is kept with probability min(1, p(x) / q(x)), where p is the model's; at the
   first rejection a token is drawn from max(0, p - q) renormalised; if all are kept, one more is
   drawn from p (Leviathan et al. 2023, Chen et al. 2023): each token is distributed exactly as the
   model alone would draw it. p and q are shaped alike (`lmforge.infer.warp_logits`, the repetition
   penalty over the same preceding tokens); a prompt-lookup draft has q = 1 at its token.
4. both KV caches roll back to the kept tokens (`cache.length`: later writes overwrite the rest).
Every round adds 1 to K + 1 tokens for one pass of the model. Near the end of the context the rounds
draft fewer tokens, then slide the window as the plain loop does.

One sequence at a time (rows keep different numbers of tokens, and a KV cache has one length for all
rows): `generate_ids` takes a single prompt; `generate` runs its prompts and samples one by one.
The drafter must share the model's vocabulary (`check_draft`), and the model must be decoder-only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from lmforge import kernels
from lmforge.errors import UserError
from lmforge.infer import Generative, apply_repetition_penalty, model_device, warp_logits

PROMPT_LOOKUP = "prompt-lookup"
MAX_NGRAM = 3  # prompt lookup matches the last 3 tokens, else 2, else 1


def check_draft(model: Generative, draft: Generative | str, draft_tokens: int, tokenizer: Any = None) -> None:
    """A UserError unless `draft` can speculate for `model`: "prompt-lookup" or a decoder-only model with
    the same vocabulary (and, where both have one, the same tokenizer); `draft_tokens` >= 1."""
    if draft_tokens < 1:
        raise UserError(f"--draft-tokens = {draft_tokens}; expected >= 1")
    if hasattr(model, "generation_batches"):
        raise UserError(f"speculative decoding (--draft) needs a decoder-only model; this one is "
                        f"{getattr(model.config, 'kind', 'conditioned')}")
    if isinstance(draft, str):
        if draft != PROMPT_LOOKUP:
            raise UserError(f"--draft {draft!r}: expected a draft model or {PROMPT_LOOKUP!r}")
        return
    if hasattr(draft, "generation_batches"):
        raise UserError(f"the draft model must be decoder-only; it is {getattr(draft.config, 'kind', 'conditioned')}")
    ours, theirs = model.config.vocab_size, draft.config.vocab_size
    if ours != theirs:
        raise UserError(f"the draft model's vocabulary ({theirs} tokens) differs from the target's ({ours}); "
                        "a draft needs the same tokenizer")
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    other = getattr(draft, "tokenizer", None)
    if tokenizer is not None and other is not None and tokenizer is not other and _vocab(tokenizer) != _vocab(other):
        raise UserError("the draft model's tokenizer differs from the target's (other tokens or ids); "
                        "a draft needs the same tokenizer")


def _vocab(tokenizer: Any) -> tuple[int, dict[str, int] | None]:
    """What two tokenizers must share for one's ids to mean the other's: the size and the token -> id map."""
    backend = getattr(tokenizer, "backend", None)
    return tokenizer.vocab_size, backend.get_vocab(with_added_tokens=True) if backend is not None else None


class PromptLookup:
    """Drafts from the sequence itself: the tokens after the earliest earlier occurrence of its last n-gram."""

    def __init__(self, max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self.first: dict[tuple[int, ...], int] = {}  # n-gram -> where it first starts
        self.indexed = 0  # n-grams ending before this position are in `first`

    def propose(self, seq: list[int], k: int) -> list[int]:
        """Up to `k` tokens that may follow `seq` (none when its ending never occurred before)."""
        for end in range(self.indexed + 1, len(seq) + 1):
            for n in range(1, min(self.max_ngram, end) + 1):
                self.first.setdefault(tuple(seq[end - n:end]), end - n)
        self.indexed = len(seq)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            start = self.first[tuple(seq[-n:])]
            if start + n < len(seq):  # an occurrence before the ending itself
                return seq[start + n:start + n + k]
        return []


class DraftModel:
    """A smaller model that proposes tokens by sampling (or greedily), keeping its own KV cache in step."""

    def __init__(self, model: Generative, longest: int, device: torch.device):
        self.model = model
        self.block_size = model.config.block_size
        self.cache = model.new_cache(1, min(self.block_size, longest))
        self.start = 0  # the position in the sequence of the cache's first token (> 0 after a slide)
        self.device = device

    def propose(self, seq: list[int], k: int, shape: Callable[[torch.Tensor, list[int]], torch.Tensor],
                greedy: bool, generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        """Up to `k` tokens after `seq`, and the distribution (V,) each was drawn from (empty when greedy)."""
        pending = seq[self.start + self.cache.length:]  # tokens the cache has not read (at least the last)
        if self.cache.length + len(pending) + k - 1 > self.cache.max_len:  # no room: restart from the last half
            self.start = max(0, len(seq) - self.block_size // 2)
            self.cache = self.model.new_cache(1, self.block_size)
            pending = seq[self.start:]
        k = min(k, self.cache.max_len - self.cache.length - len(pending) + 1)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        step = torch.tensor([pending], device=self.device)
        for _ in range(k):
            logits = shape(self.model(step, cache=self.cache, last_only=True)[:, -1], tokens)  # (1, V)
            if greedy:
                token = int(logits.argmax())
            else:
                p = logits.softmax(dim=-1)
                token = int(torch.multinomial(p, 1, generator=generator))
                probs.append(p[0])
            tokens.append(token)
            step = torch.tensor([[token]], device=self.device)
        return tokens, probs

    def keep(self, length: int) -> None:
        """Forget what the cache read beyond the sequence's first `length` tokens (the rejected drafts)."""
        self.cache.length = min(self.cache.length, max(length - self.start, 0))


@torch.inference_mode()
def speculative_ids(
    model: Generative,
    prompt: Sequence[int],
    draft: Generative | str,
    draft_tokens: int = 4,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    on_tokens: Callable[[torch.Tensor], bool] | None = None,
    stats: dict[str, int] | None = None,
    use_kernels: bool | None = None,
) -> list[int]:
    """The new ids after one `prompt`, drafted by `draft` and checked by `model` (the module docstring).

    Options as `lmforge.infer.generate.generate_ids` (which checks them, and calls this); `on_tokens`
    gets each kept token in turn, (1,), as the plain loop gives it each step's. `stats` (a dict) is
    filled with `drafted` and `accepted` draft tokens, `passes` of the model and `new_tokens`.
    """
    check_draft(model, draft, draft_tokens)
    device = model_device(model)
    block_size = model.config.block_size
    greedy = temperature == 0
    seq = list(prompt)
    cache = model.new_cache(1, min(block_size, len(seq) + max_new_tokens))
    step_input = seq  # what the cache has not read yet: the prompt, then the last token (a window after a slide)
    drafter: PromptLookup | DraftModel = PromptLookup() if isinstance(draft, str) else \
        DraftModel(draft, len(seq) + max_new_tokens, device)
    counts = {"drafted": 0, "accepted": 0, "passes": 0, "new_tokens": 0}

    def shape(logits: torch.Tensor, drafted: list[int]) -> torch.Tensor:
        """Logits (1, V) as a step of the plain loop shapes them after seq + drafted: penalised, then warped."""
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, torch.tensor([seq + drafted], device=device), repetition_penalty)
        return logits if greedy else warp_logits(logits, temperature, top_k, top_p)

    def uniform() -> float:
        return float(torch.rand(1, generator=generator, device=device))

    new: list[int] = []
    with ExitStack() as packed:  # CPU: weights packed once, for the model's K + 1 rows and the draft's 1 row
        packed.enter_context(kernels.generating(model, rows=draft_tokens + 1, enabled=use_kernels,
                                                steps=max_new_tokens))
        if isinstance(drafter, DraftModel):
            packed.enter_context(kernels.generating(drafter.model, rows=1, enabled=use_kernels, steps=max_new_tokens))
        while len(new) < max_new_tokens:
            if cache.length + len(step_input) > cache.max_len:  # context full: slide the window as the loop does
                step_input = seq[-(block_size // 2):]
                cache = model.new_cache(1, block_size)
            room = cache.max_len - cache.length - len(step_input)
            # a prompt (or a slid window) is read alone, in a plain step: its logits are only needed at the end
            k = min(draft_tokens, max_new_tokens - len(new) - 1, room) if len(step_input) == 1 else 0
            if k <= 0:
                drafts, q = [], []
            elif isinstance(drafter, PromptLookup):
                drafts, q = drafter.propose(seq, k), []
            else:
                drafts, q = drafter.propose(seq, k, shape, greedy, generator)
            read = cache.length
            ids = torch.tensor([step_input + drafts], device=device)
            logits = model(ids, cache=cache, last_only=not drafts)[0, -(len(drafts) + 1):]  # (k + 1, V)
            kept: list[int] = []
            for i, x in enumerate(drafts + [None]):
                p = shape(logits[i:i + 1], kept)  # (1, V): after seq + the drafts kept so far
                if greedy:
                    token = int(p.argmax())
                    if token == x:
                        kept.append(x)
                        continue
                else:
                    p = p.softmax(dim=-1)[0]
                    if x is not None:
                        qx = q[i][x] if q else 1.0  # a prompt-lookup draft has probability 1
                        if uniform() * qx < p[x]:  # kept with probability min(1, p(x) / q(x))
                            kept.append(x)
                            continue
                        if q:
                            rest = (p - q[i]).clamp(min=0)
                        else:
                            rest = p.clone()
                            rest[x] = 0
                        p = rest if rest.sum() > 0 else p  # (rest is empty only by rounding)
                    token = int(torch.multinomial(p, 1, generator=generator))
                kept.append(token)
                break
            counts["drafted"] += len(drafts)
            counts["accepted"] += len(kept) - 1
            counts["passes"] += 1
            cache.length = read + len(step_input) + len(kept) - 1  # roll back past the rejected drafts
            if isinstance(drafter, DraftModel):
                drafter.keep(len(seq) + len(kept) - 1)
            stop = False
            for token in kept:
                seq.append(token)
                new.append(token)
                if (on_tokens is not None and on_tokens(torch.tensor([token], device=device))) or token == eos_id:
                    stop = True
                    break
            step_input = seq[-1:]
            if stop:
                break
    counts["new_tokens"] = len(new)
    if stats is not None:
        for name, value in counts.items():
            stats[name] = stats.get(name, 0) + value
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id)]
    return new
