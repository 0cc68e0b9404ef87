"""The one generate loop: batched sampling with a KV cache, stop strings and streaming.

    texts = generate(model, "ROMEO:", max_new_tokens=100, temperature=0.8, top_k=50)
    ids = generate_ids(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)     # greedy

Any model with `forward(ids, cache=, last_only=)` and `new_cache(batch, max_len, pad)` works. Prompts
of different lengths are left-padded; padding is masked out of attention and positions. When a
sequence reaches the model's context, the cache is rebuilt from the last half of the context and
generation goes on (a sliding window). A conditioned model (seq2seq: the encoder's output; vae: the
latent z) gets its `condition` through the cache: `generate_ids(model, prompts, condition=...)`, or
`generate(model, texts, condition=...)`, which every model's `generate` calls. Beam search is
`lmforge.infer.beam.beam_search_ids`, on the same model interface (`generate(..., beam_size=4)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.errors import UserError
from lmforge.models.linear import packed_weights


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
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as in transformers): shrink the logits of tokens already in `seen` (B, S)."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, seen, scores)


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of token ids left-padded into one batch (B, T), and the number of padding tokens (B,) of each row.

    The padding id is 0; the KV cache's `pad` keeps it out of attention and positions.
    """
    longest = max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    return tokens, pad


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
    model,
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
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return only the new ids of each.

    A row stops at `eos_id` (not included). `on_tokens(new_ids)` is called after every step with the
    tokens just chosen (B,); returning True stops the whole batch (used for stop strings).
    `condition` (tensors with one row per prompt) is put in the model's cache for it to read.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, 1)
    block_size = model.config.block_size
    if any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt: give at least one token of text")
    longest = max(len(p) for p in prompts)
    if longest >= block_size:
        raise UserError(f"prompt is {longest} tokens; the model's context is {block_size} tokens "
                        f"(leave room to generate: at most {block_size - 1})")
    device = model.head_weight.device if hasattr(model, "head_weight") else next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    B = len(prompts)
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
    with packed_weights(model, rows=B):  # on a CPU: the weights packed once (lmforge.models.linear)
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


def generate(
    model,
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
    tokenizer=None,
    condition: dict[str, torch.Tensor] | None = None,
    eos_first: bool = False,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
) -> list[str]:
    """Continue `prompt` (or each of a list of prompts) `num_samples` times; return the new texts.

    `stop` strings end a sample (the stop string is cut off). `stream=True` prints the text of a
    single sample to stdout as it is generated; a callable receives each new piece of text instead.
    An empty prompt starts from the end-of-text token (unconditional samples); with `eos_first` every
    prompt does (a decoder trained to start from it: seq2seq, vae). A conditioned model gets
    `condition`, one row per sample (prompt-major), through `generate_ids`. `beam_size` > 1 searches
    (`lmforge.infer.beam`; the sampling options then do not apply, a stream gets the text once complete).
    """
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UserError("this model has no tokenizer; load it with lmforge.load(CHECKPOINT)")
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_samples)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    eos = tokenizer.eos_id
    start = [eos] if eos_first else []
    encoded = [start + tokenizer.encode(p) if p else [eos] for p in prompts for _ in range(num_samples)]
    if stream is True:
        stream = lambda piece: print(piece, end="", flush=True)  # noqa: E731
    check_stream(stream, len(encoded))

    generated: list[list[int]] = [[] for _ in encoded]
    shown = [0] * len(encoded)  # characters already streamed

    def watch(next_ids: torch.Tensor) -> bool:
        for row, token in enumerate(next_ids.tolist()):
            if token != eos:
                generated[row].append(token)
        if not stop and not stream:
            return False
        texts = [tokenizer.decode(ids) for ids in generated]
        if stream:
            text = _cut_at_stop(texts[0], stop)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                safe = len(text) - max((len(s) - 1 for s in stop), default=0)  # a stop may be forming
                if safe > shown[0]:
                    stream(text[shown[0]:safe])
                    shown[0] = safe
        return bool(stop) and all(any(s in t for s in stop) for t in texts)

    if beam_size > 1:
        from lmforge.infer.beam import beam_search_ids

        rows = beam_search_ids(model, encoded, beam_size, max_new_tokens, length_penalty, early_stopping, eos,
                               condition)
    else:
        rows = generate_ids(model, encoded, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            eos, seed, watch, condition)
    texts = [_cut_at_stop(tokenizer.decode(ids), stop) for ids in rows]
    if stream:
        stream(texts[0][shown[0]:])
    return texts


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first of the `stop` strings in it."""
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text
