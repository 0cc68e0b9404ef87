"""Train a tiny lmforge model on prepared token shards with the real Trainer.

The subject of the resume-after-kill and DDP tests (tests/test_trainer.py):

    python tests/scripts/train_tiny.py --data DATA --out RUN --max-steps 10 [--resume] [--step-sleep 0.2]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/train_tiny.py --data ... \
        [--strategy fsdp]

`--step-sleep` makes each micro-batch take a little longer (the batches themselves are unchanged), so
that a test can kill the run between two known steps; `--sigterm-during STEP` sends the first process
SIGTERM while it trains that step, so the run stops (and saves) after it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.data import TokenShards
from lmforge.models.decoder import Decoder
from lmforge.train.objectives import RandomWindows, evaluate_tokens
from lmforge.train.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a directory written by lmforge.data.prepare")
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--eval-interval", type=int, default=3)
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--style", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep before each micro-batch")
    p.add_argument("--sigterm-during", type=int, help="SIGTERM the first process during this step (1, 2, ...)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--summary", help="write the summary fit() returns to this JSON file")
    return p.parse_args(argv)


def model_config(style: str, vocab_size: int, dropout: float) -> ModelConfig:
    if style == "gpt2":
        kinds = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, n_head=2)
    else:
        kinds = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, n_head=4, n_kv_head=2)
    return ModelConfig(vocab_size=vocab_size, block_size=32, n_layer=2, d_model=32, dropout=dropout, **kinds)


def build(argv: list[str] | None = None) -> Trainer:
    """The Trainer of a run, ready to `fit()`."""
    args = parse_args(argv)
    shards = TokenShards(args.data)
    config = model_config(args.style, shards.vocab_size, args.dropout)
    torch.manual_seed(args.seed)
    model = Decoder(config)
    train_config = TrainConfig(
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps, lr=3e-3, min_lr=3e-4,
        warmup_steps=2, precision=args.precision, eval_interval=args.eval_interval, eval_batches=2,
        log_interval=args.log_interval, seed=args.seed, strategy=args.strategy,
    )
    train, val = shards.split("train"), shards.split("val")
    windows = RandomWindows(train, config.block_size, train_config.batch_size, train_config.seed)

    def batches(step: int, part: int, rows: int) -> dict[str, torch.Tensor]:
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step + 1 == args.sigterm_during and part == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return windows(step, part, rows)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"val_loss": evaluate_tokens(m, val, config.block_size, batch_size=4, max_windows=4)["loss"]}

    return Trainer(model, train_config, args.out, batches, evaluate, tokenizer=shards.tokenizer,
                   info={"data": shards.meta["fingerprint"]}, tokens_per_row=config.block_size)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    trainer = build(argv)
    summary = trainer.fit(resume=args.resume)
    if args.summary and trainer.dist.main:
        Path(args.summary).write_text(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
