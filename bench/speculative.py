"""Speculative decoding: tokens/s against the same model without a draft, and the acceptance rate.

    python bench/speculative.py                  # 16 XSum documents, 60 new tokens, K = 2 4 6 8 (some minutes)
    python bench/speculative.py --quick          # 3 documents, K = 4: checks that it runs
    python bench/speculative.py --draft runs/student --draft-tokens 3 5   # a draft checkpoint of your own

SmolLM2-135M-Instruct (`lmforge.load("smollm2-135m-instruct")`, fp32) summarizes XSum test documents:
the prompt is the summarize task's ("Article: ...\\nOne-sentence summary:", `lmforge.tasks.text2text`)
as the user's message in the model's chat template; greedy, batch 1, at most 60 new tokens, stopping
at the end-of-text token. The same prompts run without a draft and with each drafter:
- prompt-lookup: drafts copied from the prompt (`lmforge.infer.speculative.PromptLookup`);
- a draft model: by default a "layer-skip" draft made here, the first `--draft-layers` blocks of
  SmolLM2 itself under its final norm and head (no training; same tokenizer by construction), or a
  checkpoint given with `--draft` (e.g. a distilled or pruned student with SmolLM2's tokenizer). The
  layer-skip draft is the floor, not the goal: untrained, early blocks under the last norm and head
  agree little with the whole model (a few % of drafts kept at 8-20 blocks of 30), so it shows
  what a draft costs; a trained student is what shows what one gives.
Sides alternate per round (plain, then each drafter); a round that other processes disturbed is run
again. Greedy outputs are compared token for token with the plain ones (they must be identical).

One JSON line per figure: the machine; per side `tokens_per_s` (new tokens over the whole calls,
prefill included) and `decode_tokens_per_s` (the time of a 1-token call per document taken off),
`speedup` over the plain side, `acceptance_rate` (accepted / drafted tokens), `tokens_per_pass`
(new tokens per forward pass of the model) and `identical`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_disturbance_arguments,
    emit,
    machine_state,
    measure_quietly,
    median,
    timed,
)

import lmforge  # noqa: E402
from lmforge.data import datasets  # noqa: E402
from lmforge.infer.generate import generate_ids  # noqa: E402
from lmforge.models.decoder import Decoder  # noqa: E402
from lmforge.tasks.text2text import TASKS  # noqa: E402

MODEL = "smollm2-135m-instruct"
MAX_DOCUMENT_CHARS = 3000  # about 700 tokens: the prompt stays well inside the context


def layer_skip_draft(model: Decoder, layers: int) -> Decoder:
    """The first `layers` blocks of `model` under its final norm and output head: a draft with its tokenizer."""
    draft = Decoder(replace(model.config, n_layer=layers)).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("blocks.") or int(k.split(".")[1]) < layers}
    draft.load_state_dict(state)
    draft.to(next(model.parameters()).dtype)
    draft.tokenizer = model.tokenizer
    return draft


def summarize_prompts(model: Decoder, n: int) -> list[list[int]]:
    """Token ids of the summarize prompt of the first `n` XSum test documents, in the chat template."""
    tokenizer = model.tokenizer
    records = datasets.load("xsum", split="test")[:n]
    prompts = []
    for record in records:
        message = TASKS["summarize"].template.format(source=record["document"][:MAX_DOCUMENT_CHARS].strip())
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        prompts.append(tokenizer.encode(text))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 documents, K = 4, 1 round")
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--draft", default=None, help="a draft checkpoint (default: the layer-skip draft)")
    parser.add_argument("--draft-layers", type=int, default=8, help="blocks of the layer-skip draft (of 30)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    add_disturbance_arguments(parser, budget=1200)
    args = parser.parse_args()
    if args.quick:
        args.documents, args.draft_tokens, args.rounds = 3, [4], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.perf_counter() + args.budget
    emit(machine_state())

    model = lmforge.load(MODEL)
    eos = model.tokenizer.eos_id
    if args.draft:
        draft, draft_name = lmforge.load(args.draft), args.draft
    else:
        draft, draft_name = layer_skip_draft(model, args.draft_layers), f"layer-skip {args.draft_layers} blocks"
    prompts = summarize_prompts(model, args.documents)
    emit({"figure": "speculative_setup", "model": MODEL, "documents": len(prompts),
          "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
          "max_new_tokens": args.max_new_tokens, "draft_model": draft_name,
          "draft_parameters": draft.num_parameters(), "model_parameters": model.num_parameters()})

    outputs: dict[str, list[list[int]]] = {}
    stats: dict[str, dict[str, int]] = {}

    def run(name: str, new_tokens: int, **speculation) -> None:
        counts: dict[str, int] = {}
        outputs[name] = [generate_ids(model, [p], new_tokens, temperature=0, eos_id=eos, stats=counts,
                                      **speculation)[0] for p in prompts]
        stats[name] = counts

    sides = {"plain": {}}
    for k in args.draft_tokens:
        sides[f"prompt-lookup K={k}"] = dict(draft="prompt-lookup", draft_tokens=k)
        sides[f"draft model K={k}"] = dict(draft=draft, draft_tokens=k)
    for speculation in sides.values():  # warm up: packing choices, first-use measurements
        generate_ids(model, [prompts[0]], 4, temperature=0, **speculation)
    prefill, _ = measure_quietly(lambda: timed(lambda: run("prefill", 1)), [], retries=args.retries,
                                 deadline=deadline)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    disturbed = 0
    for _ in range(args.rounds):
        for name, speculation in sides.items():
            one = lambda name=name, speculation=speculation: timed(  # noqa: E731
                lambda: run(name, args.max_new_tokens, **speculation))
            s, noisy = measure_quietly(one, [], retries=args.retries, deadline=deadline)
            seconds[name].append(s)
            disturbed += noisy
    new_tokens = {name: sum(map(len, outputs[name])) for name in sides}
    plain = median(seconds["plain"])
    for name in sides:
        s = median(seconds[name])
        counts = stats[name]
        record = {"figure": "speculative_tokens_per_s", "side": name,
                  "tokens_per_s": round(new_tokens[name] / s, 2),
                  "decode_tokens_per_s": round((new_tokens[name] - len(prompts)) / max(s - prefill, 1e-9), 2),
                  "speedup": round(plain / s, 3),
                  "decode_speedup": round((plain - prefill) / max(s - prefill, 1e-9), 3),
                  "new_tokens": new_tokens[name], "seconds": round(s, 3),
                  "rounds_seconds": [round(x, 3) for x in seconds[name]],
                  "rounds_disturbed_by_other_processes": disturbed}
        if name != "plain":
            record.update(acceptance_rate=round(counts["accepted"] / max(counts["drafted"], 1), 3),
                          tokens_per_pass=round(counts["new_tokens"] / counts["passes"], 3),
                          drafted=counts["drafted"], accepted=counts["accepted"], passes=counts["passes"],
                          identical=outputs[name] == outputs["plain"])
        emit(record)


if __name__ == "__main__":
    main()
