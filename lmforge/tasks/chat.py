"""Chat with a model in the terminal, by its chat template.

    lmforge chat smollm2-135m-instruct                          # multi-turn; /reset, /system TEXT, /exit
    lmforge chat runs/x-chat --message "What is the capital of France?"      # one answer, for scripts

    messages = [{"role": "user", "content": "Hello"}]
    answer = reply(model, messages, max_new_tokens=100)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")


def reply(model: Any, messages: list[dict], stream: Callable[[str], None] | bool | None = None,
          **options: Any) -> str:
    """The model's answer to the conversation `messages` (rendered with the chat template)."""
    tokenizer = model.tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stops = turn_stops(tokenizer, prompt)
    return model.generate(prompt, stop=stops + list(options.pop("stop", [])), stream=stream, **options)[0].strip()


def turn_stops(tokenizer: Any, prompt: str) -> list[str]:
    """The end-of-turn markers an answer to `prompt` stops at: those the tokenizer or the template uses."""
    return [s for s in END_OF_TURN if tokenizer.token_to_id(s) is not None or s in prompt]


def chat(
    model: str | Path | Any,
    system: str | None = None,
    message: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    dtype: Literal["fp32", "bf16"] = "fp32",
    device: str = "auto",
) -> list[dict]:
    """Chat with a model in the terminal, by its chat template, streaming the answers.

    Multi-turn until /exit (or the end of the input); /reset starts over, /system TEXT sets the system
    prompt. With a message: answer it once and return. Returns the conversation.

    Args:
        model: a checkpoint, run directory, Hugging Face directory, .gguf file or catalog model (in
            Python also a loaded model)
        system: the system prompt
        message: answer this one message and exit
        max_new_tokens: the most tokens of an answer
        temperature: 0 = greedy
        top_k: sample from the k most likely tokens
        top_p: sample from the smallest set of tokens with this probability
        repetition_penalty: above 1 discourages repeats
        stop: also stop an answer when this text appears (repeatable)
        seed: the seed of the sampling (default: a fresh one)
        dtype: the weights' dtype when the model is loaded here: fp32, or bf16 (half the memory)
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    if isinstance(model, (str, Path)):
        from lmforge.sources import GENERATION_DTYPES, load

        model = load(model, device=device, dtype=GENERATION_DTYPES[dtype])
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, stop=stop or [], seed=seed)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if message is not None:
        messages.append({"role": "user", "content": message})
        answer = reply(model, messages, stream=True, **options)
        print()
        return messages + [{"role": "assistant", "content": answer}]
    print("chat: type a message; /reset starts over, /system TEXT sets the system prompt, /exit quits",
          file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return messages
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            start = [{"role": "system", "content": text.removeprefix("/system").strip()}]
            messages = list(start)
            print("(system prompt set; conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        answer = reply(model, messages, stream=True, **options)
        print()
        messages.append({"role": "assistant", "content": answer})
