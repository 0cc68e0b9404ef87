"""The server under load: aggregate tokens/s and time to first token with 1, 4 and 16 concurrent streams.

    python bench/serve.py            # GPT-2 124M shape and SmolLM2-135M, batched and one at a time (minutes)
    python bench/serve.py --quick    # SmolLM2 only, 1 and 4 clients: checks that it runs

Each model is served by the real command (`lmforge serve NAME=CHECKPOINT --port P`, a subprocess with
the machine's threads), twice: with continuous batching (`--max-batch 16`) and as the baseline of one
request at a time (`--max-batch 1`: the others wait in the queue). The clients (one asyncio loop in this
process, httpx) send streaming `/v1/completions` requests all at once, `--rounds` times: a 32-token
story opening, temperature 0.8, 64 new tokens at most (fewer where the model ends the text). Figures:
aggregate generated tokens/s (usage's completion tokens of every request over the wall time of the
round), time to first token (request sent -> first text chunk) at p50 and p95 over all requests, and
the batched server's speedup over the one-at-a-time one at the same load.

GPT-2 124M shape: preset "gpt2" with random weights and SmolLM2's tokenizer (49,152 tokens); SmolLM2:
SmolLM2-135M-Instruct in fp32 (`common.smollm2_fp32`). One JSON line per figure; a Markdown table last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_state, smollm2_fp32  # noqa: E402

PROMPT = ("The old lighthouse keeper had lived alone on the island for thirty years, and every night he climbed "
          "the narrow stairs to light the lamp. One evening")
NEW_TOKENS = 64


def gpt2_shape() -> Path:
    """A GPT-2 124M-shaped checkpoint with random weights and SmolLM2's tokenizer, saved once in the cache."""
    import torch

    from lmforge.config import preset
    from lmforge.models.decoder import Decoder
    from lmforge.perf import cache_dir
    from lmforge.train.checkpoint import load_checkpoint, save_checkpoint

    path = cache_dir() / "bench" / "serve" / "gpt2-124m-shape"
    if not (path / "config.json").is_file():
        tokenizer = load_checkpoint(smollm2_fp32()).tokenizer
        torch.manual_seed(0)
        model = Decoder(dataclasses.replace(preset("gpt2"), vocab_size=tokenizer.vocab_size)).eval()
        save_checkpoint(path, model, tokenizer)
    return path


class Server:
    """`lmforge serve` in a subprocess, until the block ends."""

    def __init__(self, name: str, checkpoint: Path, max_batch: int, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "lmforge", "serve", f"{name}={checkpoint}", "--port", str(port),
                        "--max-batch", str(max_batch), "--max-queue", "64"]

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lmforge serve exited: {self.process.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("lmforge serve did not start in 5 minutes")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)


async def one_stream(client: httpx.AsyncClient, url: str, model: str, seed: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed completion."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    started, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage") and not chunk["choices"]:
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - started, tokens


async def load(url: str, model: str, clients: int, rounds: int) -> dict:
    """`clients` concurrent streams, `rounds` times: aggregate tokens/s and time to first token."""
    firsts, rates = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, model, seed=0)  # warm: kernels chosen, weights packed
        for r in range(rounds):
            started = time.perf_counter()
            results = await asyncio.gather(*(one_stream(client, url, model, seed=1000 * r + i)
                                             for i in range(clients)))
            wall = time.perf_counter() - started
            firsts += [first for first, _ in results]
            rates.append(sum(tokens for _, tokens in results) / wall)
    firsts.sort()
    return {"tokens_per_s": round(statistics.median(rates), 1),
            "ttft_p50_s": round(statistics.median(firsts), 3),
            "ttft_p95_s": round(firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per load (default 3, --quick 1)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    loads = (1, 4) if args.quick else (1, 4, 16)
    models = {"SmolLM2-135M": smollm2_fp32()} if args.quick else {"GPT-2 124M shape": gpt2_shape(),
                                                                  "SmolLM2-135M": smollm2_fp32()}
    emit(machine_state())
    rows = []
    for label, checkpoint in models.items():
        figures = {}
        for mode, max_batch in (("batched", 16), ("one at a time", 1)):
            with Server("m", checkpoint, max_batch, args.port) as server:
                for clients in loads:
                    figure = asyncio.run(load(server.url, "m", clients, rounds))
                    figures[mode, clients] = figure
                    emit({"figure": "serve", "model": label, "server": mode, "clients": clients, **figure,
                          "max_batch": max_batch, "new_tokens": NEW_TOKENS, "rounds": rounds})
        single = figures["batched", 1]["tokens_per_s"]
        for clients in loads:
            batched, alone = figures["batched", clients], figures["one at a time", clients]
            rows.append(f"| {label} | {clients} | {batched['tokens_per_s']} ({batched['tokens_per_s'] / single:.2f}x "
                        f"one stream) | {batched['ttft_p50_s']} / {batched['ttft_p95_s']} | {alone['tokens_per_s']} | "
                        f"{alone['ttft_p50_s']} / {alone['ttft_p95_s']} | "
                        f"{batched['tokens_per_s'] / alone['tokens_per_s']:.2f}x |")
    print("\n| model | concurrent streams | batched: tokens/s | batched: TTFT p50 / p95 (s) | one at a time: "
          "tokens/s | one at a time: TTFT p50 / p95 (s) | batched / one at a time |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n(os.cpu_count() = {os.cpu_count()}; {rounds} rounds per load, the median round's tokens/s)")


if __name__ == "__main__":
    main()
