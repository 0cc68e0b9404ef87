"""Beam search: the `beam_size` most likely continuations, batched, on the model protocol of the generate loop.

    rows = beam_search_ids(model, [[eos]], beam_size=4, max_new_tokens=50, eos_id=eos, condition=cond)
    texts = seq2seq_model.generate(["source text"], beam_size=4, length_penalty=1.0)   # the usual way in

Every prompt keeps `beam_size` running hypotheses, laid out as rows prompt*beam_size + beam of one
batch and one KV cache; each step scores all (beam, token) extensions by their summed log-probability,
keeps the best, and reorders the cache rows to follow them (`KVCache.select`). A hypothesis that emits
`eos_id` is finished; its score is summed log-probability / length ** `length_penalty` (> 0 favours
longer outputs, 0 compares raw log-probabilities). A prompt is done when it has `beam_size` finished
hypotheses (`early_stopping=True`), or, with `early_stopping=False`, once no running beam can still beat
its worst finished one at the current length (the heuristic of Hugging Face transformers). With
`beam_size=1` beam search is greedy decoding. The model is anything with the protocol of
`lmforge.infer`; on a CPU the steps multiply through packed weights (`lmforge.kernels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge import kernels
from lmforge.errors import UserError
from lmforge.infer import Generative, left_pad, model_device


@torch.inference_mode()
def beam_search_ids(
    model: Generative,
    prompts: Sequence[Sequence[int]],
    beam_size: int = 4,
    max_new_tokens: int = 100,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    eos_id: int | None = None,
    condition: dict[str, torch.Tensor] | None = None,
    use_kernels: bool | None = None,
) -> list[list[int]]:
    """The best continuation of each prompt (new ids only, `eos_id` not included) by beam search.

    New tokens stop at the model's context (no sliding window: the search keeps whole hypotheses).
    `condition` (tensors with one row per prompt) is repeated for each beam and put in the cache.
    `use_kernels=False` multiplies through the model's own layers (None: LMFORGE_KERNELS decides).
    """
    if beam_size < 1:
        raise UserError(f"--beam-size = {beam_size}; expected >= 1")
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens = {max_new_tokens}; expected >= 0")
    if any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt: give at least one token of text")
    block_size = model.config.block_size
    longest = max(len(p) for p in prompts)
    if longest >= block_size:
        raise UserError(f"prompt is {longest} tokens; the model's context is {block_size} tokens")
    steps = min(max_new_tokens, block_size - longest)
    device = model_device(model)
    B, K = len(prompts), beam_size
    tokens, pad = left_pad(prompts, device)
    pad = pad.repeat_interleave(K)  # (B*K,)
    cache = model.new_cache(B * K, longest + steps, pad if pad.any() else None)
    if condition:
        cache.condition = {name: t.repeat_interleave(K, dim=0) for name, t in condition.items()}
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: expand only the first at the first step
    generated = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    step_input = tokens.repeat_interleave(K, dim=0)
    with kernels.generating(model, rows=B * K, enabled=use_kernels, steps=max_new_tokens):  # CPU: packed once
        for step in range(steps):
            logits = model(step_input, cache=cache, last_only=True)[:, -1].float()  # (B*K, V)
            V = logits.shape[-1]
            candidates = (logits.log_softmax(dim=-1) + scores.view(-1, 1)).view(B, K * V)
            top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=-1)  # (B, 2K): enough to refill K beams
            top_scores, top_beam, top_token = top_scores.tolist(), (top_index // V).tolist(), (top_index % V).tolist()
            length = step + 1
            # the next beams are chosen on the CPU (from the lists above) and moved to the device in one copy each
            next_scores = torch.full((B, K), float("-inf"), device="cpu")
            next_beam = torch.zeros((B, K), dtype=torch.long, device="cpu")
            next_token = torch.zeros((B, K), dtype=torch.long, device="cpu")
            host: list[list[int]] | None = None  # `generated` on the CPU: read at most once a step
            for b in range(B):
                if done[b]:
                    continue
                n = 0
                for rank, (score, beam, token) in enumerate(zip(top_scores[b], top_beam[b], top_token[b])):
                    if score == float("-inf"):
                        break
                    if token == eos_id:
                        if rank < K:  # an end among the K best extensions finishes a hypothesis
                            host = host if host is not None else generated.tolist()
                            finished[b].append((score / length**length_penalty, host[b * K + beam]))
                        continue
                    next_scores[b, n], next_beam[b, n], next_token[b, n] = score, beam, token
                    n += 1
                    if n == K:
                        break
                if len(finished[b]) >= K:
                    finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:K]
                    best_running = next_scores[b, 0].item() / length**length_penalty
                    done[b] = early_stopping or finished[b][-1][0] >= best_running
            if all(done):
                break
            rows = (torch.arange(B, device="cpu")[:, None] * K + next_beam).view(-1).to(device)
            cache.select(rows)
            step_input = next_token.view(-1, 1).to(device)
            generated = torch.cat([generated[rows], step_input], dim=1)
            scores = next_scores.to(device)
    best = []
    last_scores, last_generated = scores.tolist(), generated.tolist()
    for b in range(B):
        hypotheses = list(finished[b])
        if not done[b]:  # out of steps: running beams compete with the finished ones
            for k in range(K):
                if last_scores[b][k] > float("-inf"):
                    hypotheses.append((last_scores[b][k] / max(len(last_generated[b * K + k]), 1)**length_penalty,
                                       last_generated[b * K + k]))
        best.append(max(hypotheses, key=lambda h: h[0])[1] if hypotheses else [])
    return best
