"""The one training loop, for every objective, in one process or many (torchrun).

    trainer = Trainer(model, train_config, out="runs/x", batches=RandomWindows(...),
                      evaluate=lambda m: {"val_loss": ...}, tokenizer=tok)
    summary = trainer.fit()            # or fit(resume=True) to continue runs/x after a stop or a kill

What it does each optimizer step: set the learning rate (linear warmup, cosine decay), run
`grad_accum` micro-batches through `loss_fn`, clip the gradient norm, step AdamW (weight decay on
matrices only), and every `eval_interval` steps evaluate and write a checkpoint atomically.

Precision: `fp32`; `bf16` keeps the model's weights in bf16 (no casts on every matmul, half the
memory traffic) while AdamW updates fp32 master copies; `fp16` uses autocast with a gradient scaler.

The run directory holds `run.yaml`, `metrics.jsonl` (one JSON line per log or eval), `loss.png` and
`checkpoint/` (with `trainer_state.pt`, so `fit(resume=True)` continues exactly: the batches depend
only on the step number, weights and AdamW moments are restored, and the random state of a
step is seeded from the step). The checkpoint before it stays in `checkpoint.prev/` until the new
one is written, fsynced and verified (lmforge.train.checkpoint), so a crash at any moment leaves
one; resuming takes the newest that verifies, and says which one it skipped and why.

SIGTERM and SIGINT during `fit` stop the run at the end of the current optimizer step (all
processes agree): the checkpoint is saved, one line says where, and `Interrupted` is raised (the
CLI exits with 128 + the signal's number); `fit(resume=True)` then continues exactly. A signal
during the last step lets the run finish as usual.
Under torchrun the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU); each
process takes its share of the same global batch, so the result matches a single process. With
`strategy: fsdp` it is sharded by FSDP2 instead (lmforge.train.fsdp): every process evaluates (a
forward pass needs them all), checkpoints keep the shards in `sharded/`, and the last one of a run
also the whole weights. One process with `fsdp` is a process group of one (sharded checkpoints).

Differential privacy: with `train.dp_epsilon` each step is DP-SGD through Opacus (lmforge.train.privacy):
a Poisson-sampled batch, per-example gradients clipped and noised, epsilon spent logged at every evaluation
and stored in lmforge.json, the run stopped at its budget.

Device: `train.device` (`--device` on the command line; `lmforge.devices.resolve_device`): auto is
cuda:LOCAL_RANK where CUDA works, else mps, else the CPU. The model moves there, each batch is moved
there as it is used (batches are made on the CPU), AdamW is fused on CPU and CUDA, `auto` precision
picks bf16 weights on a GPU that has bf16, and a resumed run's checkpoint is read onto that device
whichever device wrote it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from lmforge import kernels
from lmforge.config import TrainConfig, to_dict
from lmforge.devices import resolve_device
from lmforge.errors import Interrupted, UserError
from lmforge.files import remove_leftovers
from lmforge.perf import matmul_peak
from lmforge.train import fsdp, privacy
from lmforge.train.checkpoint import (
    SHARDED,
    TRAINER_STATE,
    load_trainer_state,
    load_weights,
    previous_of,
    save_checkpoint,
    verify_checkpoint,
)
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import build_optimizer, lr_at

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on a GPU that has it; on a CPU, bf16 where its measured matmul peak beats fp32's by
    10% (`lmforge.perf.matmul_peak`, cached per machine), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if matmul_peak(torch.bfloat16, device) > 1.1 * matmul_peak(torch.float32, device) else "fp32"


class Distributed:
    """Rank and world size from torchrun's environment (a single process when they are absent), and the
    device of this process: `device` as `lmforge.devices.resolve_device` reads it (under torchrun a GPU
    is cuda:LOCAL_RANK)."""

    def __init__(self, device: str | torch.device = "auto", group: bool = False) -> None:
        """`group`: make a process group even for a single process (FSDP needs one)."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = resolve_device(device, "train.device")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if (self.enabled or group) and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.enabled:
                dist.init_process_group(backend)
            else:  # a group of one, in this process: nothing to rendezvous with
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (so all processes stop together)."""
        return self.max(float(flag)) > 0

    def max(self, value: float) -> float:
        """The largest `value` of all processes, on every process."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class StopSignals:
    """While active, SIGTERM and SIGINT only record `signum` (the first one received), for the Trainer
    to stop at the end of its step; a second Ctrl-C stops at once (KeyboardInterrupt, no checkpoint).

    Python runs signal handlers in the main thread only: elsewhere this does nothing. The previous
    handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            if signum == signal.SIGINT:  # os.write: print() may be in the middle of writing to stderr
                os.write(2, b"\nSIGINT: saving a checkpoint after this step (Ctrl-C again stops at once without it)\n")


class Trainer:
    """Trains `model` on `batches` with `loss_fn`; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        out: str | Path,
        batches: Callable[[int, int, int], dict[str, torch.Tensor]],
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = causal_lm_loss,
        tokenizer: Any = None,
        info: dict[str, Any] | None = None,
        tokens_per_row: float | None = None,
        flops_per_token: float | None = None,
        steps_per_epoch: int | None = None,
    ):
        self.config = config.validate()
        self.out = Path(out)
        self.batches, self.evaluate, self.loss_fn = batches, evaluate, loss_fn
        self.tokenizer, self.info = tokenizer, dict(info or {})
        self.tokens_per_row, self.flops_per_token = tokens_per_row, flops_per_token
        self.steps_per_epoch = steps_per_epoch
        self.sharded = config.strategy == "fsdp"
        self.dist = Distributed(config.device, group=self.sharded)
        rows_per_step = config.batch_size // (config.grad_accum * self.dist.world)
        if rows_per_step * config.grad_accum * self.dist.world != config.batch_size or rows_per_step == 0:
            raise UserError(f"train.batch_size = {config.batch_size} does not split evenly over "
                            f"{config.grad_accum} accumulation steps x {self.dist.world} processes")
        self.rows = rows_per_step
        self.model = model.to(self.dist.device)
        self.private = config.dp_epsilon is not None  # differential privacy (lmforge.train.privacy)
        if self.private:
            privacy.refuse_unsupported(config, self.dist.world)
        self.precision = resolve_precision("fp32" if self.private else config.precision, self.dist.device)
        self.dtype = PRECISIONS[self.precision]
        self.trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
        if self.sharded:  # FSDP2: sharded parameters in place (DTensors); bf16 through its mixed precision
            fsdp.shard(self.model, self.precision)
            self.master = None
        elif self.precision == "bf16":
            # fp32 master weights of the trained parameters for AdamW; the model computes in bf16
            self.master = [p.detach().float().clone().requires_grad_() for p in model.parameters() if p.requires_grad]
            self.model.to(torch.bfloat16)
        else:
            self.master = None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.trainable_names, self.master or self.trainable, config,
                                         fused=self.dist.device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.precision == "fp16")
        self.forward_model: nn.Module = self.model
        if self.dist.enabled and not self.sharded:
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.device] if self.dist.device.type == "cuda" else None)
        if config.activation_checkpointing:  # memory: each block's activations remade in the backward pass
            supported = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
            if not supported:
                raise UserError(f"train.activation_checkpointing: {type(model).__name__} does not support it "
                                f"(lmforge's models do)")
            for m in supported:
                m.activation_checkpointing = True
        # speed: hardware kernels swapped into the model's layers (lmforge.kernels; LMFORGE_KERNELS=off: none);
        # not under DP, whose per-example gradients need the standard layers
        self.kernels = kernels.apply(self.model, for_="train", enabled=False if self.private else None)
        self.privacy = None
        if self.private:  # Opacus's per-example gradients, clipping and noise around the model and AdamW
            self.privacy = privacy.PrivateTraining(self.model, self.optimizer, config, batches, self.rows)
            self.optimizer = self.privacy.optimizer
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.step = 0
        self.best_val, self.bad_evals = math.inf, 0  # for early stopping and `best/`
        self.running_loss, self.running_steps = 0.0, 0  # training loss since the last evaluation

    # ------------------------------------------------------------------------------------------
    # state: checkpoints and resume

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights to save: fp32 master copies in bf16 mode, else the model's own. Under FSDP every
        process calls it and the main one gets them all (the others nothing)."""
        if self.sharded:
            return fsdp.full_weights(self.model)
        if self.master is None:
            return self.model.state_dict()
        state = self.model.state_dict()
        for name, master in zip(self.trainable_names, self.master):
            state[name] = master.detach()
        return state

    def save(self, metrics: dict[str, Any], directory: str = "checkpoint", resumable: bool = True,
             final: bool = False) -> None:
        """Write `directory` (from the main process; under FSDP every process calls this and writes its
        shards). `final`: under FSDP the whole weights too (the last checkpoint of a run)."""
        if not self.dist.main and not self.sharded:
            return
        shards = None
        if self.sharded and resumable:  # every process writes its shards; the main one moves them in
            shards = self.out / f".{directory}.tmp-{SHARDED}"  # a crash's leftover, removed on resume
            fsdp.save_sharded(shards, self.model, self.optimizer, self.dist.main)
        weights = self.weights() if final or not resumable or not self.sharded else None
        if not self.dist.main:
            return
        trainer_state = {
            "step": self.step,
            "strategy": self.config.strategy,
            "scaler": self.scaler.state_dict(),
            "world": self.dist.world,
            "best_val": self.best_val,
            "bad_evals": self.bad_evals,
            "running_loss": self.running_loss,
            "running_steps": self.running_steps,
        }
        if not self.sharded:  # FSDP's optimizer state is in the shards
            trainer_state["optimizer"] = self.optimizer.state_dict()
        if self.privacy is not None:
            trainer_state["privacy"] = self.privacy.state()
        if weights is not None and any(hasattr(m, "peft_config") for m in self.model.modules()):
            # only adapters are saved (of a LoRA model, or a LoRA backbone under a task head): the fp32
            # values of everything that trains travel here too
            trainer_state["trainable"] = {name: weights[name].float() for name in self.trainable_names}
        info = {**self.info, "train": to_dict(self.config), "precision": self.precision, "step": self.step, **metrics}
        if self.privacy is not None:
            info["privacy"] = self.privacy.record(self.step)
        save_checkpoint(self.out / directory, self.model, self.tokenizer, info,
                        trainer_state if resumable else None, weights, keep_previous=resumable, sharded=shards)

    def load(self) -> None:
        """Restore the run from its newest checkpoint that verifies (see `_checkpoint_to_resume`)."""
        directory, skipped = self._checkpoint_to_resume()
        state = load_trainer_state(directory)
        if state.get("strategy", "ddp") != self.config.strategy:
            raise UserError(f"{directory} was saved by a run with train.strategy = {state.get('strategy', 'ddp')!r}; "
                            f"resume it with the same strategy")
        if self.sharded:
            fsdp.load_sharded(directory / SHARDED, self.model, self.optimizer)
        else:
            self._load_weights(directory, state)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.privacy is not None:
            if "privacy" not in state:
                raise UserError(f"{directory} was saved by a run without differential privacy; resume it without "
                                f"train.dp.epsilon")
            self.privacy.restore(state["privacy"])
        elif "privacy" in state:
            raise UserError(f"{directory} was saved by a differentially private run; resume it with the same "
                            f"train.dp.epsilon")
        self.step = state["step"]
        self.best_val, self.bad_evals = state.get("best_val", math.inf), state.get("bad_evals", 0)
        self.running_loss, self.running_steps = state.get("running_loss", 0.0), state.get("running_steps", 0)
        if skipped and self.dist.main:
            tqdm.write(f"{skipped}; resuming from {directory} (step {self.step}) instead")
        _truncate_metrics(self.out / "metrics.jsonl", self.step)

    def _load_weights(self, directory: Path, state: dict[str, Any]) -> None:
        weights = state["trainable"] if "trainable" in state else load_weights(directory)
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                if name in parameters:
                    parameters[name].copy_(value)
            for name, master in zip(self.trainable_names, self.master or []):
                master.copy_(weights[name])

    def _checkpoint_to_resume(self) -> tuple[Path, str | None]:
        """`checkpoint/`, or `checkpoint.prev/` where that one is missing or damaged; and what was wrong.

        A skipped `checkpoint/` moves to `checkpoint.damaged/`, so that the next save keeps the good
        one as its spare; hidden copies a killed save left behind are deleted.
        """
        newest = self.out / "checkpoint"
        previous = previous_of(newest)
        problems = []
        for directory in [newest] + ([previous] if previous.exists() else []):
            problem = _resume_problem(directory)
            if problem is None:
                break
            problems.append(problem)
        else:
            raise UserError(f"{self.out} has no resumable checkpoint ({'; '.join(problems)})")
        self.dist.barrier()  # every process has chosen before the main one moves anything
        if self.dist.main:
            if problems and newest.exists():
                damaged = newest.with_name(newest.name + ".damaged")
                shutil.rmtree(damaged, ignore_errors=True)
                newest.rename(damaged)
                problems[0] += f"; {newest.name}/ moved to {damaged.name}/"
            remove_leftovers(newest, previous)
            remove_leftovers(self.out / "best")
        return directory, (problems[0] if problems else None)

    # ------------------------------------------------------------------------------------------
    # the loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `max_steps` (or `max_minutes`); return the summary of the final evaluation.

        SIGTERM or SIGINT stops the run after the current step with a checkpoint: `Interrupted`."""
        with StopSignals() as signals:
            return self._fit(resume, signals)

    def _fit(self, resume: bool, signals: StopSignals) -> dict[str, Any]:
        config, main = self.config, self.dist.main
        if resume:
            self.load()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        peak = matmul_peak(self.dtype if self.dtype != torch.float16 else torch.float32, self.dist.device)
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not main, unit="step", dynamic_ncols=True)
        start_time, last_time, last_step, metrics = time.perf_counter(), time.perf_counter(), self.step, {}
        saved_at, stopped_early, patience_out = None, False, False
        end = config.max_steps if self.privacy is None else min(config.max_steps, self.privacy.budget_steps)
        while self.step < end:
            loss = self.train_step()
            if not math.isnan(loss):  # NaN: a DP step whose Poisson batch drew nobody
                self.running_loss, self.running_steps = self.running_loss + loss, self.running_steps + 1
            self.step += 1
            bar.update(1)
            if self.step % config.log_interval == 0 or self.step == end:
                loss = self.dist.mean(loss)
                now = time.perf_counter()
                record = {"step": self.step, "loss": round(loss, 6), "lr": lr_at(self.step - 1, config)}
                if math.isnan(loss):  # a DP step that drew nobody has no loss
                    del record["loss"]
                if self.tokens_per_row:
                    tokens_per_s = (self.step - last_step) * config.batch_size * self.tokens_per_row / (now - last_time)
                    record["tokens_per_s"] = round(tokens_per_s, 1)
                    if self.flops_per_token:
                        record["mfu"] = round(tokens_per_s * self.flops_per_token / (peak * self.dist.world), 4)
                last_time, last_step = now, self.step
                bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v)
                                 for k, v in record.items() if k in ("loss", "tokens_per_s", "mfu")})
                self._log(record)
            out_of_time = config.max_minutes is not None and time.perf_counter() - start_time > 60 * config.max_minutes
            stopped_early = self.dist.any(out_of_time) and self.step < end
            last = self.step == end or stopped_early
            if self.step % config.eval_interval == 0 or last:
                train_loss = self.dist.mean(self.running_loss / max(self.running_steps, 1))
                self.running_loss, self.running_steps = 0.0, 0  # before the save: a resume starts afresh
                metrics, patience_out = self.eval_and_save(train_loss, last)
                saved_at = self.step
                last_time = time.perf_counter()  # tokens/s counts training time only
            signum = int(self.dist.max(signals.signum))  # every process stops at the same step
            if signum and self.step < end:
                bar.close()
                self._stop(signum, saved=saved_at == self.step)
            if stopped_early or (patience_out and self.step < end):
                break
        bar.close()
        if end < config.max_steps and self.step == end and main:
            tqdm.write(f"stopped at step {self.step} of {config.max_steps}: the privacy budget (epsilon "
                       f"{self.privacy.target_epsilon:g} at delta {self.privacy.delta:.3g}) is spent")
        if stopped_early and main:
            tqdm.write(f"stopped at step {self.step} of {config.max_steps}: the time budget of "
                       f"{config.max_minutes} minutes is spent")
        if patience_out and main and self.step < config.max_steps:
            tqdm.write(f"stopped early at step {self.step}: validation loss has not improved for "
                       f"{config.patience} evaluations (best {self.best_val:.4f}, kept in {self.out / 'best'})")
        if saved_at != self.step:  # nothing left to train (a finished run resumed)
            metrics, _ = self.eval_and_save(None, last=True)
        summary = {"step": self.step, "train_seconds": round(time.perf_counter() - start_time, 1), **metrics}
        if self.best_val < math.inf:
            summary["best_val_loss"] = round(self.best_val, 6)
        return summary

    def _stop(self, signum: int, saved: bool) -> NoReturn:
        """Save a resumable checkpoint (unless this step's evaluation just did), say so, raise `Interrupted`."""
        # the running loss of the main process is saved: make it the mean, as the next evaluation reports it
        self.running_loss = self.dist.mean(self.running_loss)
        if not saved:
            self.save({})
        self.dist.barrier()
        message = (f"stopped by {signal.Signals(signum).name} at step {self.step} of {self.config.max_steps}; "
                   f"checkpoint saved in {self.out / 'checkpoint'}; run the same command with --resume to continue")
        if self.dist.main:
            tqdm.write(message, file=sys.stderr)
        raise Interrupted(signum, message)

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss of this process."""
        config = self.config
        lr = lr_at(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.model.train()
        # the random state (dropout) of a step depends only on (seed, step, rank): resumes are exact
        torch.manual_seed(config.seed + 1_000_003 * self.step + 7919 * self.dist.rank)
        if self.privacy is not None:  # Poisson-sampled, clipped and noised (lmforge.train.privacy)
            loss = self.privacy.step(self.step, self.loss_fn, lambda batch: to_device(batch, self.dist.device))
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        total = torch.zeros((), device=self.dist.device)  # summed on the device: one .item() per step
        for micro in range(config.grad_accum):
            part = micro * self.dist.world + self.dist.rank
            batch = to_device(self.batches(self.step, part, self.rows), self.dist.device)
            sync = micro == config.grad_accum - 1 or not self.dist.enabled
            with (contextlib.nullcontext() if sync or self.sharded else self.forward_model.no_sync()), \
                    self._autocast():
                loss = self.loss_fn(self.forward_model, batch) / config.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach().float()
            if self.master is not None:
                self._gather_master_grads(first=micro == 0)
        params = self.master if self.master is not None else [p for p in self.model.parameters()]
        self.scaler.unscale_(self.optimizer)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for p, master in zip(self.trainable, self.master):
                    p.copy_(master)
        return total.item()

    def _gather_master_grads(self, first: bool) -> None:
        """Move the bf16 gradients of this micro-batch into the fp32 master gradients."""
        for p, master in zip(self.trainable, self.master):
            if p.grad is None:
                continue
            if first:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

    def _autocast(self):
        if self.precision == "fp16":
            return torch.autocast(self.dist.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def eval_and_save(self, train_loss: float | None, last: bool = False) -> tuple[dict[str, Any], bool]:
        """Evaluate, log, write the checkpoint (and `best/` when validation loss improved).

        Returns the metrics and whether early stopping says to stop (the same on every process).
        `last`: the run ends here (under FSDP its checkpoint then holds the whole weights too).
        """
        config, metrics, main = self.config, {}, self.dist.main
        if train_loss is not None:
            metrics["train_loss"] = round(train_loss, 6)
        if self.privacy is not None:
            metrics["epsilon"] = round(self.privacy.epsilon(self.step), 4)
        if self.evaluate is not None and (main or self.sharded):  # FSDP: a forward pass takes every process
            self.model.eval()
            with torch.no_grad(), self._autocast():
                metrics.update({k: round(v, 6) for k, v in self.evaluate(self.model).items()})
        improved = self.dist.any(main and "val_loss" in metrics and metrics["val_loss"] < self.best_val)
        if "val_loss" in metrics:
            self.best_val, self.bad_evals = (metrics["val_loss"], 0) if improved else (self.best_val,
                                                                                       self.bad_evals + 1)
        if main:
            record = {"step": self.step, **metrics}
            if self.steps_per_epoch:
                record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), **metrics}
            self._log(record)
            tqdm.write(describe(record) + (" (best)" if improved and config.keep_best else ""))
        stop = self.dist.any(main and config.patience is not None and self.bad_evals > config.patience)
        if improved and config.keep_best:
            self.save(metrics, "best", resumable=False)
        self.save(metrics, final=last or stop)
        return metrics, stop

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any], title: str) -> dict[str, Any]:
        """Close a run: draw `loss.png` from metrics.jsonl and write `summary.json` (main process only)."""
        if self.dist.main:
            from lmforge.plots import plot_metrics

            plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png", title=title)
            partial = self.out / ".summary.json.partial"
            partial.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            partial.replace(self.out / "summary.json")
        return summary


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device` (batches are made on the CPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def describe(record: dict[str, Any]) -> str:
    """"Epoch 2: train loss 1.2345, val loss 1.3456" (or "step 200: ...") for an evaluation record."""
    head = f"Epoch {record['epoch']:g}" if "epoch" in record else f"step {record['step']}"
    parts = [f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items() if k not in ("step", "epoch")]
    return f"{head}: " + ", ".join(parts)


def _resume_problem(directory: Path) -> str | None:
    """Why `directory` cannot be resumed from (missing, not resumable, damaged), or None."""
    if not directory.is_dir():
        return f"{directory} is missing"
    if not (directory / TRAINER_STATE).is_file():
        return f"{directory / TRAINER_STATE} is missing"
    try:
        verify_checkpoint(directory)
    except UserError as e:
        return str(e)
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics written after the checkpoint being resumed (they will be made again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by the stop
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
