"""The one generate loop, for every model kind: batched sampling with a KV cache, stop strings, streaming.

    texts = generate(model, "ROMEO:", max_new_tokens=100, temperature=0.8, top_k=50)
    texts = generate(seq2seq_model, ["a source text"], beam_size=4)    # every kind, the same call
    ids = generate_ids(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)     # greedy, on token ids

The loop talks to a model only through the protocol of `lmforge.infer` (a forward pass
with a KV cache; a conditioned model's `generation_batches`), never importing `lmforge.models`; every
model's `generate` method calls `generate` here. Prompts of different lengths are left-padded;
padding is masked out of attention and positions. When a sequence reaches the model's context, the
cache is rebuilt from the last half of the context and generation goes on (a sliding window). A
conditioned model (seq2seq: the encoder's output; vae: the latent z) gets its condition through the
cache (`generate_ids(model, prompts, condition=...)`). Beam search is `lmforge.infer.beam.beam_search_ids`,
on the same protocol (`generate(..., beam_size=4)`); speculative decoding is `lmforge.infer.speculative`
(`generate(..., draft=small_model or "prompt-lookup")`). On a CPU the steps multiply through weights
packed once per call (`lmforge.kernels.generating`; `use_kernels=False` or LMFORGE_KERNELS=off: not).

One output convention for every model kind: `generate` returns a list of texts, one per prompt and
sample, prompt-major ([prompt 0 sample 0, prompt 0 sample 1, ..., prompt 1 sample 0, ...]), each
without its prompt and cut before the first stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lmforge import kernels
from lmforge.errors import UserError
from lmforge.infer import (
    Generative,
    apply_repetition_penalty,
    batches,
    continuation_prompts,
    left_pad,
    model_device,
    warp_logits,
)
from lmforge.infer.beam import beam_search_ids
from lmforge.infer.speculative import check_draft, speculative_ids


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_stream(stream: Callable[[str], None] | bool | None, n_outputs: int) -> None:
    """Streaming shows a single output: a UserError when `stream` is asked for with more than one."""
    if stream and n_outputs > 1:
        raise UserError("streaming shows one sample; use --num-samples 1 (and a single prompt) to stream")


def _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_samples) -> None:
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens = {max_new_tokens}; expected >= 0")
    if temperature < 0:
        raise UserError(f"--temperature = {temperature}; expected >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k = {top_k}; expected >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p = {top_p}; expected a value in (0, 1]")
    if repetition_penalty <= 0:
        raise UserError(f"--repetition-penalty = {repetition_penalty}; expected > 0 (1 = off)")
    if num_samples < 1:
        raise UserError(f"--num-samples = {num_samples}; expected >= 1")


@torch.inference_mode()
def generate_ids(
    model: Generative,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
    on_tokens: Callable[[torch.Tensor], bool] | None = None,
    condition: dict[str, torch.Tensor] | None = None,
    use_kernels: bool | None = None,
    draft: Generative | str | None = None,
    draft_tokens: int = 4,
    stats: dict[str, int] | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return only the new ids of each.

    A row stops at `eos_id` (not included). `on_tokens(new_ids)` is called after every step with the
    tokens just chosen (B,); returning True stops the whole batch (used for stop strings).
    `condition` (tensors with one row per prompt) is put in the model's cache for it to read.
    `use_kernels=False` multiplies through the model's own layers (None: LMFORGE_KERNELS decides).
    `draft` (a draft model with the same tokenizer, or "prompt-lookup") decodes speculatively, proposing
    `draft_tokens` tokens per step (`lmforge.infer.speculative`: the same output as without it when
    greedy, the same distribution when sampling; one prompt only; `on_tokens` then gets the tokens one
    at a time); `stats` (a dict) is filled with its counts (drafted, accepted, passes, new_tokens).
    """
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, 1)
    block_size = model.config.block_size
    if any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt: give at least one token of text")
    longest = max(len(p) for p in prompts)
    if longest >= block_size:
        raise UserError(f"prompt is {longest} tokens; the model's context is {block_size} tokens "
                        f"(leave room to generate: at most {block_size - 1})")
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    B = len(prompts)
    if draft is not None:
        if B > 1 or condition:
            raise UserError("speculative decoding (--draft) continues one prompt at a time, without a condition")
        return [speculative_ids(model, prompts[0], draft, draft_tokens, max_new_tokens, temperature, top_k, top_p,
                                repetition_penalty, eos_id, generator, on_tokens, stats, use_kernels)]
    tokens, pad = left_pad(prompts, device)  # (B, T), (B,)
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # filled column by column
    n = 0  # columns of `new` filled
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(B, min(block_size, longest + max_new_tokens), pad if pad.any() else None)
    if condition:
        cache.condition = dict(condition)
    step_input = tokens
    is_pad = torch.arange(tokens.shape[1], device=device)[None] < pad[:, None]
    prompt_text = torch.where(is_pad, tokens[:, -1:], tokens)  # for the repetition penalty: padding is not text
    with kernels.generating(model, rows=B, enabled=use_kernels, steps=max_new_tokens):  # CPU: weights packed once
        for _ in range(max_new_tokens):
            if cache.length + step_input.shape[1] > cache.max_len:  # context full: slide the window
                keep = block_size // 2
                step_input = torch.cat([tokens, new[:, :n]], dim=1)[:, -keep:]
                cut = tokens.shape[1] + n - keep
                shifted = (pad - cut).clamp(min=0)
                cache = model.new_cache(B, block_size, shifted if shifted.any() else None)
                if condition:
                    cache.condition = dict(condition)
            logits = model(step_input, cache=cache, last_only=True)[:, -1]  # (B, V)
            if repetition_penalty != 1.0:
                seen = torch.cat([prompt_text, new[:, :n]], dim=1)
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_ids = torch.where(done, eos_id, next_ids)
                done |= next_ids == eos_id
            new[:, n] = next_ids
            n += 1
            step_input = new[:, n - 1:n]
            if on_tokens is not None and on_tokens(next_ids):
                break
            if eos_id is not None and bool(done.all()):
                break
    out = []
    for row in new[:, :n].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(row)
    return out


@torch.inference_mode()
def generate(
    model: Generative,
    prompt: str | Sequence[str] = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    num_samples: int = 1,
    seed: int | None = None,
    stream: Callable[[str], None] | bool | None = None,
    tokenizer: Any = None,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    batch_size: int | None = None,
    use_kernels: bool | None = None,
    draft: Generative | str | None = None,
    draft_tokens: int = 4,
    stats: dict[str, int] | None = None,
    **options: Any,
) -> list[str]:
    """Generate from `prompt` (or each of a list of prompts) `num_samples` times; return the new texts.

    One text per prompt and sample, prompt-major (the module docstring's output convention). `stop`
    strings end a sample (the stop string is cut off). `stream=True` prints the text of a single
    sample to stdout as it is generated; a callable receives each new piece of text instead. A
    decoder continues each prompt; an empty one starts from the end-of-text token (unconditional
    samples). A conditioned model turns the texts into prompts and conditions itself
    (`generation_batches`, which takes `options`, e.g. a seq2seq model's `too_long`). At most
    `batch_size` sequences generate at once (None: all). `beam_size` > 1 searches (`lmforge.infer.beam`;
    the sampling options then do not apply, a stream gets the text once complete). `draft`,
    `draft_tokens` and `stats` decode speculatively (`generate_ids`), one prompt and sample at a time
    (the i-th with seed `seed + i`).
    """
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UserError("this model has no tokenizer; load it with lmforge.load(CHECKPOINT)")
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_samples)
    if beam_size < 1:
        raise UserError(f"--beam-size = {beam_size}; expected >= 1")
    texts = [text for text in ([prompt] if isinstance(prompt, str) else prompt) for _ in range(num_samples)]
    if stream is True:
        stream = lambda piece: print(piece, end="", flush=True)  # noqa: E731
    check_stream(stream, len(texts))
    if draft is not None:
        check_draft(model, draft, draft_tokens, tokenizer)
        if beam_size > 1:
            raise UserError("--draft decodes without beam search; use --beam-size 1")
        batch_size = 1
    make_batches = getattr(model, "generation_batches", None)
    if make_batches is None:
        if options:
            raise UserError(f"{', '.join(options)}: not an option of this model's generate")
        make_batches = _continuation_batches
    out: list[str] = []
    for i, (prompts, condition) in enumerate(make_batches(texts, tokenizer, batch_size, seed, **options)):
        if beam_size > 1:
            rows = beam_search_ids(model, prompts, beam_size, max_new_tokens, length_penalty, early_stopping,
                                   tokenizer.eos_id, condition, use_kernels)
            found = [cut_at_stop(tokenizer.decode(ids), stop) for ids in rows]
            if stream:
                stream(found[0])
            out += found
        else:
            row_seed = seed + i if seed is not None and draft is not None else seed
            out += _sample_texts(model, tokenizer, prompts, condition, max_new_tokens, temperature, top_k, top_p,
                                 repetition_penalty, stop, row_seed, stream, use_kernels, draft, draft_tokens, stats)
    return out


def _continuation_batches(texts: Sequence[str], tokenizer: Any, batch_size: int | None, seed: int | None
                          ) -> Iterable[tuple[list[list[int]], None]]:
    """What a model without `generation_batches` generates from: each text continued, no condition."""
    return ((list(prompts), None) for prompts in batches(continuation_prompts(texts, tokenizer), batch_size))


def _sample_texts(model, tokenizer, prompts, condition, max_new_tokens, temperature, top_k, top_p,
                  repetition_penalty, stop, seed, stream, use_kernels, draft=None, draft_tokens=4, stats=None
                  ) -> list[str]:
    """One batch through `generate_ids`, decoded, stopped at `stop` strings and streamed as it goes."""
    eos = tokenizer.eos_id
    generated: list[list[int]] = [[] for _ in prompts]
    shown = [0]  # characters already streamed

    def watch(next_ids: torch.Tensor) -> bool:  # each step's tokens, read on the CPU: only for stops and streams
        for row, token in enumerate(next_ids.tolist()):
            if token != eos:
                generated[row].append(token)
        texts = [tokenizer.decode(ids) for ids in generated]
        if stream:
            text = cut_at_stop(texts[0], stop)
            safe = showable_length(text, stop)
            if safe > shown[0]:
                stream(text[shown[0]:safe])
                shown[0] = safe
        return bool(stop) and all(any(s in t for s in stop) for t in texts)

    rows = generate_ids(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                        eos, seed, watch if stop or stream else None, condition, use_kernels, draft, draft_tokens,
                        stats)
    texts = [cut_at_stop(tokenizer.decode(ids), stop) for ids in rows]
    if stream:
        stream(texts[0][shown[0]:])
    return texts


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first of the `stop` strings in it."""
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def showable_length(text: str, stop: Sequence[str]) -> int:
    """How much of a text still being generated (cut at its stops) may be streamed: nothing while it ends in
    part of a multi-byte character, and never its last characters, from which a stop string may be forming."""
    if text.endswith("\ufffd"):
        return 0
    return len(text) - max((len(s) - 1 for s in stop), default=0)
