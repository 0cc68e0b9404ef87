"""GPU smoke test: the verbs on one GPU through the command line, then lmforge next to transformers.

    bash bench/gpu_smoke.sh                      # on a CUDA machine: the gpu tests, then this (< 5 minutes)
    python bench/gpu_smoke.py --device cuda:1    # this part alone, on another GPU
    python bench/gpu_smoke.py --cpu-check        # tiny sizes on the CPU: proves the script, measures nothing

1. The verbs, run as a user runs them (`lmforge.cli.main`, with `--device`): `prepare` a synthetic corpus,
   `pretrain` gpt-mini for 200 steps, `finetune --method lora` on prompt/completion pairs, `classify
   train` + `classify predict`, `generate` 200 tokens. Each prints its tokens/s (training: the Trainer's
   own figure from metrics.jsonl; inference: timed here).
2. GPT-2 124M shape (preset gpt2, random weights, the same on both sides), bf16, batch 8 x 1024:
   training steps of lmforge's Trainer (bf16 weights, fp32 master copies, fused AdamW) next to
   transformers' GPT2LMHeadModel (autocast bf16, fused AdamW), eager and under torch.compile, with
   tokens/s and MFU against the GPU's measured bf16 matmul peak (`lmforge.perf.matmul_peak`); then
   greedy generation of 200 new tokens at batch 1 and 8 on both sides (bf16 weights).
Prints one JSON line per figure and, at the end, a markdown table for the README.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, gpt2_config, hf_gpt2, machine_state, median  # noqa: E402
from generate import agreement  # noqa: E402
from train_throughput import BATCH, make_step  # noqa: E402

from lmforge.cli import main as lmforge_main  # noqa: E402
from lmforge.config import ModelConfig, preset  # noqa: E402
from lmforge.devices import resolve_device  # noqa: E402
from lmforge.infer.generate import generate_ids  # noqa: E402
from lmforge.models.decoder import Decoder, flops_per_token  # noqa: E402
from lmforge.perf import matmul_peak  # noqa: E402

WORDS = ("the king and queen walk in the garden at night while the river sings of old days and every bird of "
         "the forest answers with a song of spring but winter comes to the castle on the hill").split()
PREDICT_TEXTS = 2048
SIZES = {  # the real run on a GPU, and the --cpu-check run that only proves the script
    "gpu": dict(corpus_lines=40_000, vocab=8192, pretrain="gpt-mini", pretrain_steps=200, finetune_steps=60,
                classify_steps=60, new_tokens=200, compare="gpt2", compare_steps=10, rounds=2),
    "cpu": dict(corpus_lines=600, vocab=320, pretrain="tiny", pretrain_steps=6, finetune_steps=3,
                classify_steps=3, new_tokens=8, compare="tiny-gpt2", compare_steps=2, rounds=1),
}


def lmforge(*args: str, quiet: bool = False) -> None:
    """One `lmforge` command in this process, as the CLI runs it (`quiet`: its standard output dropped); a
    failure stops the smoke test."""
    print("$ lmforge " + " ".join(args), file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        code = lmforge_main(list(args))
    if code != 0:
        raise SystemExit(f"lmforge {' '.join(args)} failed with exit code {code}")


def trainer_figures(run: Path) -> dict:
    """The median tokens/s and MFU the Trainer logged (the first log, which holds start-up, left out)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speed = [r for r in records if "tokens_per_s" in r][1:] or [r for r in records if "tokens_per_s" in r]
    out = {"tokens_per_s": round(median([r["tokens_per_s"] for r in speed]), 1)} if speed else {}
    if speed and "mfu" in speed[0]:
        out["mfu"] = round(median([r["mfu"] for r in speed]), 4)
    return out


def synced(device: torch.device, fn) -> float:
    """Seconds of one call of `fn`, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def corpus(work: Path, lines: int) -> tuple[Path, Path, Path, Path]:
    """A synthetic corpus (text), prompt/completion pairs (jsonl), labelled texts (jsonl) and texts to classify."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in
                 range(lines)]
    text = work / "corpus.txt"
    text.write_text("\n".join(sentences) + "\n")
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": s + "\nShort:", "completion": " " + s.split()[0]}) + "\n"
                             for s in sentences[:512]))
    labelled = work / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": s, "label": "king" if "king" in s else "other"}) + "\n"
                                for s in sentences[:512]))
    unlabelled = work / "classify.txt"
    unlabelled.write_text("\n".join(sentences[:PREDICT_TEXTS]) + "\n")
    return text, pairs, labelled, unlabelled


def verbs(work: Path, device: str, size: dict) -> list[dict]:
    """Part 1: the verbs on `device`; returns one row per verb."""
    text, pairs, labelled, unlabelled = corpus(work, size["corpus_lines"])
    dev = ["--device", device]
    lmforge("prepare", "--data", str(text), "--out", str(work / "data"), "--vocab-size", str(size["vocab"]))
    lmforge("pretrain", "--data", str(work / "data"), "--out", str(work / "pretrain"), "--preset", size["pretrain"],
            "--train.max_steps", str(size["pretrain_steps"]), "--train.eval_interval", str(size["pretrain_steps"]),
            "--train.eval_batches", "4", "--train.log_interval", "2", *dev)
    rows = [{"verb": f"pretrain {size['pretrain']} ({size['pretrain_steps']} steps)",
             **trainer_figures(work / "pretrain")}]
    model = str(work / "pretrain" / "checkpoint")
    lmforge("finetune", model, str(pairs), "--out", str(work / "lora"), "--method", "lora",
            "--train.max_steps", str(size["finetune_steps"]), "--train.batch_size", "16", *dev)
    rows.append({"verb": "finetune --method lora", **trainer_figures(work / "lora")})
    lmforge("classify", "train", model, str(labelled), "--out", str(work / "classify"),
            "--train.max_steps", str(size["classify_steps"]), "--train.log_interval", "1", *dev)
    rows.append({"verb": "classify train (lora)", **trainer_figures(work / "classify")})
    texts = min(PREDICT_TEXTS, size["corpus_lines"])
    seconds = synced(resolve_device(device), lambda: lmforge(
        "classify", "predict", str(work / "classify"), "--data", str(unlabelled), *dev, quiet=True))
    rows.append({"verb": f"classify predict ({texts} texts, load included)", "texts_per_s": round(texts / seconds, 1)})
    seconds = synced(resolve_device(device), lambda: lmforge(
        "generate", str(work / "pretrain"), "--prompt", "The king", "--max-new-tokens", str(size["new_tokens"]),
        "--num-samples", "8", "--seed", "0", *dev, quiet=True))
    rows.append({"verb": f"generate 8 x {size['new_tokens']} tokens (load included)",
                 "tokens_per_s": round(8 * size["new_tokens"] / seconds, 1)})
    for row in rows:
        emit({"figure": "verb", "device": device, **row})
    return rows


def compare_config(name: str) -> ModelConfig:
    if name == "tiny-gpt2":  # the --cpu-check stand-in for GPT-2: its kinds, a toy's sizes
        return replace(preset("gpt2"), vocab_size=512, block_size=64, n_layer=2, n_head=2, n_kv_head=2, d_model=64,
                       d_ff=256, dropout=0.0).validate()
    return replace(preset(name), dropout=0.0).validate()


def training_pairs(config: ModelConfig, device: torch.device, size: dict, peak: float) -> list[dict]:
    """Part 2a: training steps of both sides, eager and compiled, in bf16."""
    torch.manual_seed(0)
    state = Decoder(config).state_dict()
    tokens = BATCH * config.block_size
    flops = flops_per_token(config, config.block_size)
    rows = []
    for compiled in (False, True):
        for side in ("lmforge", "transformers"):
            step, precision, _ = make_step(side, "bf16", compiled, state, config, str(device))
            numbers = iter(range(10**6))
            for _ in range(3):  # warm-up: compilation, AdamW state, allocator
                step(next(numbers))

            def steps(step=step, numbers=numbers) -> None:
                for _ in range(size["compare_steps"]):
                    step(next(numbers))

            seconds = [synced(device, steps) / size["compare_steps"] for _ in range(size["rounds"])]
            tok_s = tokens / median(seconds)
            rows.append({"figure": "train_tokens_per_s", "side": side, "compiled": compiled, "precision": precision,
                         "tokens_per_s": round(tok_s, 1), "mfu": round(tok_s * flops / peak, 4)})
            emit(rows[-1])
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def generation_pairs(config: ModelConfig, device: torch.device, size: dict) -> list[dict]:
    """Part 2b: greedy generation, both sides, bf16 weights, batch 1 and 8."""
    torch.manual_seed(0)
    model = Decoder(config).eval()
    hf = hf_gpt2(model).eval()
    model.to(device, torch.bfloat16)
    hf.to(device, torch.bfloat16)
    n, rows = size["new_tokens"], []
    for batch in (1, 8):
        prompts = torch.randint(0, config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
        outputs = {}

        def ours(prompts=prompts, outputs=outputs) -> None:
            outputs["lmforge"] = generate_ids(model, prompts.tolist(), max_new_tokens=n, temperature=0)

        def theirs(prompts=prompts, outputs=outputs) -> None:
            ids = prompts.to(device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=config.vocab_size - 1)
            outputs["transformers"] = out[:, prompts.shape[1]:].tolist()

        for name, fn in (("lmforge", ours), ("transformers", theirs)):
            fn()  # warm-up
            tok_s = batch * n / median([synced(device, fn) for _ in range(size["rounds"])])
            rows.append({"figure": "generate_tokens_per_s", "side": name, "batch": batch, "new_tokens": n,
                         "tokens_per_s": round(tok_s, 1)})
            emit(rows[-1])
        emit({"figure": "generate_greedy_agreement", "batch": batch,
              **agreement(outputs["lmforge"], outputs["transformers"])})
    return rows


def table(verb_rows: list[dict], train_rows: list[dict], generate_rows: list[dict], device: str, gpu: str,
          shape: str) -> str:
    """The markdown the README takes."""
    lines = [f"GPU smoke test on {gpu} ({device}), `bash bench/gpu_smoke.sh`:", "",
             "| verb | tokens/s | MFU |", "|---|---:|---:|"]
    for r in verb_rows:
        speed = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else f"{r['texts_per_s']:,.0f} texts/s"
        lines.append(f"| {r['verb']} | {speed} | {format(r['mfu'], '.1%') if 'mfu' in r else ''} |")
    lines += ["", f"| {shape}, bf16 | lmforge tokens/s | transformers tokens/s | ratio | "
              "lmforge MFU | transformers MFU |", "|---|---:|---:|---:|---:|---:|"]
    for compiled in (False, True):
        a, b = (next(r for r in train_rows if r["side"] == s and r["compiled"] == compiled)
                for s in ("lmforge", "transformers"))
        lines.append(f"| training, {'torch.compile' if compiled else 'eager'} | {a['tokens_per_s']:,.0f} | "
                     f"{b['tokens_per_s']:,.0f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | {a['mfu']:.1%} | "
                     f"{b['mfu']:.1%} |")
    for batch in (1, 8):
        a, b = (next(r for r in generate_rows if r["side"] == s and r["batch"] == batch)
                for s in ("lmforge", "transformers"))
        lines.append(f"| greedy generation, batch {batch}, {a['new_tokens']} new tokens | {a['tokens_per_s']:,.0f} | "
                     f"{b['tokens_per_s']:,.0f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="the GPU (default: cuda, i.e. cuda:LOCAL_RANK or cuda:0)")
    parser.add_argument("--cpu-check", action="store_true",
                        help="tiny sizes on the CPU: checks the script end to end; its figures mean nothing")
    parser.add_argument("--work", help="a directory for the runs (default: a temporary one, removed after)")
    args = parser.parse_args()
    device_name = "cpu" if args.cpu_check else args.device
    device = resolve_device(device_name)
    if device.type != "cuda" and not args.cpu_check:
        raise SystemExit(f"{device_name} is not a CUDA GPU; run with --cpu-check to check the script on the CPU")
    size = SIZES["cpu" if args.cpu_check else "gpu"]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU (--cpu-check)"
    emit({**machine_state(), "device": str(device), "gpu": gpu,
          "cuda": torch.version.cuda, "bf16": device.type != "cuda" or torch.cuda.is_bf16_supported()})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmforge-gpu-smoke-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        verb_rows = verbs(work, device_name, size)
    config = compare_config(size["compare"])
    gpt2_config(config)  # the shape maps onto GPT2LMHeadModel (raises otherwise)
    peak = matmul_peak(torch.bfloat16, device)
    emit({"figure": "matmul_peak", "dtype": "bf16", "device": str(device), "tflop_per_s": round(peak / 1e12, 2)})
    train_rows = training_pairs(config, device, size, peak)
    generate_rows = generation_pairs(config, device, size)
    emit({"figure": "wall_seconds", "seconds": round(time.perf_counter() - start, 1)})
    name = "GPT-2 124M" if size["compare"] == "gpt2" else size["compare"]
    shape = f"{name} shape, batch {BATCH} x {config.block_size}"
    print("\n" + table(verb_rows, train_rows, generate_rows, str(device), gpu, shape))


if __name__ == "__main__":
    main()
