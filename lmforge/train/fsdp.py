"""FSDP2 for the Trainer (`--train.strategy fsdp`): parameters, gradients and AdamW's moments sharded.

    shard(model, "bf16")                      # each transformer block, then the root: fully_shard
    save_sharded(path, model, optimizer)      # every process writes its shards (torch.distributed.checkpoint)
    load_sharded(path, model, optimizer)      # every process reads its own, whatever the old world size was
    weights = full_weights(model)             # the whole fp32 state dict, on the main process only

Each block of `nn.ModuleList`s (lmforge's `blocks` and `encoder`, a transformers model's `h` or
`layers`) is one FSDP unit and the root holds the rest (embeddings, final norm, the tied head): a
process keeps 1/world of every parameter and gathers a block's weights just for its forward and
backward passes. bf16 is FSDP's `MixedPrecisionPolicy`: the sharded parameters are fp32 (the master
copies AdamW updates), the gathered ones bf16, gradients reduced in fp32. Each micro-batch's
gradients are reduce-scattered at once (no unsharded gradients kept between micro-batches: memory
before communication). Gradients are DTensors: `clip_grad_norm_` computes the global norm over them.

A resumable checkpoint keeps the sharded model and optimizer in `sharded/` (lmforge.train.checkpoint);
the Trainer's last one also holds the consolidated `model.safetensors`, and `lmforge.load` reads a
`sharded/` one directly (`lmforge consolidate` writes it as a normal checkpoint).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard(model: nn.Module, precision: str) -> None:
    """Apply FSDP2 in place: every block of the model's `nn.ModuleList`s, then the root module.

    `precision`: fp32, or bf16 (bf16 compute on fp32 shards); fp16 is refused by TrainConfig.validate."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for blocks in reversed([m for m in model.modules() if isinstance(m, nn.ModuleList)]):  # the innermost first
        for block in blocks:
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, main: bool) -> None:
    """Every process writes its shards of the model and optimizer to the directory `path` (made afresh)."""
    if main:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore the model and optimizer from `save_sharded`'s directory (every process, collectively)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)  # AdamW's moments made, to be filled
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict in the CPU memory of the main process (empty elsewhere); every process calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
