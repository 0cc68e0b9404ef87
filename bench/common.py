"""Shared pieces of the benchmarks: the machine state, the GPT-2 weight map, timing rounds, JSON lines.

Not run directly; `bench/train_throughput.py` and `bench/generate.py` import it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from lmforge.config import ModelConfig
from lmforge.models.decoder import Decoder
from lmforge.models.hf import hf_family, state_dict_to_hf, to_hf_config
from lmforge.perf import OtherLoad, cpu_model

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def emit(record: dict) -> None:
    """One JSON line per figure, flushed at once (the parent of a worker reads it line by line)."""
    print(json.dumps(record), flush=True)


def allocator() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return f"jemalloc ({os.environ.get('MALLOC_CONF', 'default conf')})"
    if "tcmalloc" in preload:
        return "tcmalloc"
    return "glibc malloc"


def machine_state() -> dict:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return {
        "figure": "machine",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "amx": "amx_tile" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": sys.version.split()[0],
        "allocator": allocator(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


# ------------------------------------------------------------------------------------------------
# a model's quality on held-out text, and its greedy decoding speed

PROMPT = list(range(1000, 1032))  # 32 token ids: the prompt of every decoding-speed figure


def smollm2_fp32():
    """SmolLM2-135M-Instruct in fp32 (the GGUF's Q4_1 weights dequantized), imported once into the benchmarks'
    cache: the real model that bench/quantize.py, prune.py and distill.py measure."""
    import lmforge
    from lmforge.perf import cache_dir

    path = cache_dir() / "bench" / "quantize" / "smollm2-fp32"
    if not (path / "config.json").is_file():
        lmforge.import_model("smollm2-135m-instruct", path, dequantize=True)
    return path


def held_out(tokenizer, quick: bool) -> dict[str, tuple[list[int], int]]:
    """{name: (token ids, UTF-8 bytes)} of two held-out texts: the first 400 verses of kjv's test split
    and the first 24,000 characters of the Shakespeare test play As You Like It (--quick: less)."""
    from lmforge.data import load

    verses = [r["text"] for r in load("kjv", "test")[: 100 if quick else 400]]
    play = next(r["text"] for r in load("shakespeare", "test") if r["title"] == "as_you_like_it")
    texts = {"kjv test": "\n".join(verses), "shakespeare held-out": play[: 8_000 if quick else 24_000]}
    return {name: ([tokenizer.eos_id, *tokenizer.encode(text)], len(text.encode("utf-8")))
            for name, text in texts.items()}


def held_out_quality(model, quick: bool) -> dict[str, dict[str, float]]:
    """{text: {perplexity, bits_per_byte}} of `model` on the held-out texts, scored in windows of its context."""
    import numpy as np

    from lmforge.eval.metrics import perplexity
    from lmforge.train.objectives import bits_per_byte, evaluate_tokens

    record = {}
    for name, (ids, utf8) in held_out(model.tokenizer, quick).items():
        result = evaluate_tokens(model, np.array(ids, dtype=np.int64), model.config.block_size, 4)
        record[name] = {"perplexity": round(perplexity(result["loss"]), 3),
                        "bits_per_byte": round(bits_per_byte(result["loss"], len(ids) - 1, utf8), 4)}
    return record


def greedy_tokens_per_s(model, batch: int, new: int, rounds: int = 2) -> float:
    """The best of `rounds` greedy decodes of `new` tokens from PROMPT at `batch` rows, in tokens/s."""
    from lmforge.infer.generate import generate_ids

    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        generate_ids(model, [PROMPT] * batch, max_new_tokens=new, temperature=0)
        best = max(best, batch * new / (time.perf_counter() - start))
    return round(best, 1)


# ------------------------------------------------------------------------------------------------
# lmforge GPT-2 style weights -> Hugging Face GPT2LMHeadModel, through lmforge.models.hf's tables

def gpt2_config(c: ModelConfig):
    """The transformers GPT2Config of the same shape as a GPT-2 style lmforge ModelConfig (`to_hf_config`),
    with dropout as in `c` and PyTorch's scaled_dot_product_attention, as lmforge uses."""
    from transformers import GPT2Config

    if hf_family(c) != "gpt2" or not c.tie_embeddings:
        raise ValueError("only GPT-2 style decoders with tied embeddings map onto GPT2LMHeadModel here")
    last = c.vocab_size - 1
    config = GPT2Config(**{**to_hf_config(c, bos_id=last, eos_id=last), "pad_token_id": last})
    config._attn_implementation = "sdpa"
    return config


def load_hf_weights(hf, state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Copy lmforge weights `state` into transformers model `hf` by the key table `lmforge export --format hf`
    uses (`state_dict_to_hf`); a tied head is the embedding in transformers too."""
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(state, config), strict=False)
    tied = ("lm_head.weight",) if config.tie_embeddings else ()
    missing = [k for k in missing if k not in tied and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"weight map mismatch: missing {missing}, unexpected {unexpected}")


def hf_gpt2(model: Decoder):
    """A GPT2LMHeadModel (fp32, SDPA attention) holding the same weights as lmforge decoder `model`."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(gpt2_config(model.config))
    load_hf_weights(hf, model.state_dict(), model.config)
    return hf


@torch.no_grad()
def max_logit_difference(model: Decoder, hf, ids: torch.Tensor) -> float:
    """Largest |logit difference| between the two models on `ids` (both fp32, eval mode)."""
    model.eval()
    hf.eval()
    return (model(ids) - hf(ids).logits).abs().max().item()


# ------------------------------------------------------------------------------------------------
# timing

def measure_quietly(measure: Callable[[], float], pids: list[int], retries: int = 3, max_other_cores: float = 0.2,
                    deadline: float | None = None, best: Callable[..., float] = min) -> tuple[float, bool]:
    """Run `measure`; repeat it while other processes kept more than `max_other_cores` busy meanwhile,
    up to `retries` times and not past `deadline` (a time.perf_counter() value). Returns (the value of
    the first undisturbed run, or the `best` of the disturbed ones; whether it was disturbed)."""
    values = []
    for _ in range(retries + 1):
        with OtherLoad(pids) as load:
            value = measure()
        if load.cores <= max_other_cores:
            return value, False
        values.append(value)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return best(values), True


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each side's measurement once per round, in turn (A B A B ...); noise hits both alike."""
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            results[name].append(measure())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Seconds per call of fn, over `repeat` calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


class WorkerProcess:
    """The parent's handle on one benchmark side run in its own process: it reads one JSON command per
    line on stdin and answers each with one JSON line on stdout; `close` sends {"op": "quit"}."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit code {self.process.wait()})")
        return json.loads(line)

    def send(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> dict:
        answer = self.send(op="quit")
        self.process.wait()
        return answer


def add_disturbance_arguments(parser, retries: int = 2, budget: float = 600) -> None:
    """--retries and --budget: how long `measure_quietly` keeps repeating rounds other processes disturbed."""
    parser.add_argument("--retries", type=int, default=retries,
                        help="times a round is repeated while other processes keep the CPUs busy")
    parser.add_argument("--budget", type=float, default=budget,
                        help="seconds after which disturbed rounds are no longer repeated")


def add_generation_arguments(parser) -> None:
    """The shape of a generation benchmark: --quick, --rounds, --new-tokens, --batch."""
    parser.add_argument("--quick", action="store_true", help="1 round per batch size")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
