"""Chat with a model in the terminal, by its chat template.

    lmforge chat smollm2-135m-instruct                          # multi-turn; /reset, /system TEXT, /exit
    lmforge chat runs/x-chat --message "What is the capital of France?"      # one answer, for scripts

    messages = [{"role": "user", "content": "Hello"}]
    answer = reply(model, messages, max_new_tokens=100)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")


def reply(model: Any, messages: list[dict], stream: Callable[[str], None] | bool | None = None,
          **options: Any) -> str:
    """The model's answer to the conversation `messages` (rendered with the chat template)."""
    tokenizer = model.tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stops = [s for s in END_OF_TURN if tokenizer.token_to_id(s) is not None or s in prompt]
    return model.generate(prompt, stop=stops + list(options.pop("stop", [])), stream=stream, **options)[0].strip()


def chat(model: Any, system: str | None = None, message: str | None = None, **options: Any) -> list[dict]:
    """Answer `message` once, or talk until /exit (or end of input); return the conversation."""
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
