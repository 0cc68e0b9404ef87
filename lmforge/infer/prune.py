"""Pruning: zero the weights that matter least, or cut whole heads, neurons and blocks out of a decoder.

    lmforge prune runs/x --method wanda --sparsity 0.5 --calib kjv --out runs/x-50          # unstructured
    lmforge prune runs/x --method wanda --pattern 2:4 --calib kjv --out runs/x-24            # 2 of every 4
    lmforge prune runs/x --pattern structured --sparsity 0.25 --calib kjv --recover-steps 200 --out runs/x-s25
    lmforge.prune("runs/x", "runs/x-s25", pattern="structured", sparsity=0.25, calib="kjv")
    model = lmforge.load("runs/x-s25")     # generate, chat, eval, quantize, export work on it unchanged

Masks (`--pattern unstructured` or `N:M`) zero weights of every linear layer of the blocks (the token
embedding and the output head stay whole), scored by
- `magnitude`: |W|, compared within each layer (each of the q, k, v and gate, up parts of lmforge's
  fused projections on its own, as they are separate layers elsewhere);
- `wanda` (Sun et al. 2023, "A simple and effective pruning approach for large language models"):
  |W_ij| * ||X_j||_2, the weight times the norm of its input over calibration text (`--calib`),
  compared within each output row, as the paper does; no retraining.
`N:M` (2:4, 4:8) zeroes the N lowest-scored weights of every M consecutive inputs of a row, the
pattern sparse tensor cores run at twice the speed (on GPUs; a CPU gains nothing from it). The result
is an ordinary dense checkpoint with zeros, and `config.json` records the pruning (`pruning`: method,
pattern, sparsity, the zeroed share of each layer): smaller once compressed, not faster.

`--pattern structured` makes a genuinely smaller dense model, ranked by importance on calibration
text (LLM-Pruner, Ma et al. 2023; Minitron, Muralidharan et al. 2024): `--sparsity` is the share of
the blocks' parameters to remove (the token embedding is not counted, nor cut). Removed, by their
contribution to the block's output over the calibration tokens (`wanda`; `magnitude` ranks by the
weight norms instead, with no calibration):
- whole blocks, `--drop-blocks K` of them first, those that change their input least (1 - cosine of
  the block's output with its input, "block influence", Men et al. 2024);
- attention heads: the same number of query heads in every key/value group (grouped-query attention)
  or whole heads (multi-head attention), ranked by the norm of their share of the attention output;
- MLP neurons: the rest of the budget, ranked by ||X_j|| * ||W_down[:, j]||, the norm of each one's
  contribution; the width stays a multiple of 32 where it was one.
Every block keeps the same shape, so the result is a plain `ModelConfig` (fewer `n_layer`, `n_head`,
a smaller `d_ff`, the same `head_dim`) that every verb loads.

`--recover-steps N` then trains the pruned model on `--recover-data` text (the calibration text by
default) through the fine-tuning recipe, fully or with LoRA (`--recover-method`): OUT becomes that
run's directory (its metrics, loss curve and checkpoints; `lmforge.load(OUT)` takes its best one) with
the model as pruned, before recovery, in `OUT/pruned`. Full recovery keeps a mask's zeros at zero (their
gradients are masked); LoRA recovery of a masked model is refused, since its update would fill them in.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.config import FinetuneTrainConfig, ModelConfig, settings, to_dict
from lmforge.data.sources import calibration_sequences
from lmforge.errors import UserError
from lmforge.files import check_new_directory
from lmforge.models.decoder import Decoder
from lmforge.models.layers import Block
from lmforge.recipes.classify import HEAD_CONFIG
from lmforge.recipes.finetune import Finetune
from lmforge.sources import load
from lmforge.train.checkpoint import resolve_checkpoint, save_checkpoint
from lmforge.train.objectives import calibration_pass
from lmforge.train.recipe import Job, run_recipe, say

PATTERN = re.compile(r"(\d+):(\d+)")


@settings(train=FinetuneTrainConfig)
def prune(
    checkpoint: str | Path,
    out: str | Path,
    method: Literal["magnitude", "wanda"] = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    calib: str | None = None,
    drop_blocks: int = 0,
    recover_steps: int = 0,
    recover_data: str | None = None,
    recover_method: Literal["full", "lora"] = "full",
    calib_samples: int = 32,
    calib_tokens: int = 256,
    text_field: str = "text",
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Prune a decoder: zero its least important weights, or cut heads, neurons and blocks out of it.

    Every verb loads the result like any checkpoint (generate, chat, eval, quantize, export). With
    --recover-steps, OUT is the recovery run's directory (the model before recovery in OUT/pruned).
    Returns OUT.

    Args:
        checkpoint: a checkpoint or run directory (or any decoder lmforge.load takes)
        out: the checkpoint (or, with --recover-steps, run) directory to create
        method: how weights are scored: magnitude (|W|) or wanda (|W| x the norm of its input on --calib
            text; for structured pruning, each part's contribution to the output on that text)
        sparsity: the share of weights to zero (unstructured), or of the blocks' parameters to remove
            (structured), in [0, 1); an N:M pattern implies N/M
        pattern: unstructured, N:M (e.g. 2:4: N zeros in every M consecutive inputs) or structured
            (remove heads, MLP neurons and --drop-blocks blocks: a smaller dense model)
        calib: calibration text (a file, folder or glob of txt/jsonl/csv/parquet files, or a catalog name such
            as kjv); needed by wanda and by --drop-blocks
        drop_blocks: structured: whole blocks to remove (counted in --sparsity)
        recover_steps: then train the pruned model this many steps on --recover-data (0: no recovery)
        recover_data: the recovery text (default: --calib)
        recover_method: recovery trains all weights (full) or LoRA adapters
        calib_samples: the calibration sequences
        calib_tokens: the tokens of each calibration (and recovery) sequence
        text_field: the jsonl field / csv or parquet column of the text
        overrides: train.FIELD settings of the recovery (e.g. train.lr, train.batch_size)
    """
    out = Path(out)
    check_new_directory(out)
    sparsity, nm = check_settings(method, sparsity, pattern, calib, drop_blocks, recover_steps,
                                  recover_data, recover_method, calib_samples, calib_tokens)
    if is_classifier(checkpoint):
        raise UserError(f"{checkpoint} is a classifier; prune the decoder it was trained from, then train "
                        "the classifier on the pruned one")
    model = load(checkpoint, dequantize=True)  # a quantized model is pruned in float
    if not isinstance(model, Decoder):
        raise UserError(f"{checkpoint} is a {getattr(model.config, 'kind', type(model).__name__)} model; "
                        "lmforge prune takes a decoder (causal LM)")
    if getattr(model, "pruning", None):
        say(f"note: {checkpoint} was pruned before ({model.pruning['pattern']}); pruning it further")
    sequences = None
    if (calib or recover_steps) and model.tokenizer is None:
        raise UserError(f"{checkpoint} has no tokenizer to read --calib / --recover-data text with")
    if calib:
        sequences = calibration_sequences(calib, model.tokenizer, calib_samples,
                                          min(calib_tokens, model.config.block_size), text_field)
    parameters = model.num_parameters()
    record: dict[str, Any] = {"method": method, "pattern": pattern, "sparsity": sparsity,
                              **({"calibration": {"data": str(calib), "samples": calib_samples,
                                                  "tokens": calib_tokens}} if calib else {})}
    masks: dict[str, torch.Tensor] = {}
    if pattern == "structured":
        model, cut = prune_structured(model, sparsity, method, sequences, drop_blocks)
        record.update(cut)
    else:
        masks = prune_masks(model, sparsity, method, nm, sequences)
        record["layers"] = {name: round(1 - mask.float().mean().item(), 6) for name, mask in masks.items()}
        for name, mask in masks.items():
            model.get_submodule(name).weight.data.mul_(mask)
    model.pruning = record
    info = {"pruned_from": str(checkpoint), "parameters_before": parameters,
            "parameters": model.num_parameters(), "nonzero_parameters": nonzero_parameters(model)}
    say(f"pruned {checkpoint}: {describe(record, info)}")
    if not recover_steps:
        save_checkpoint(out, model, info=info)
        return out
    recipe = Recovery(model, recover_data or calib, out, recover_method, recover_steps, masks, info,
                      calib_tokens, text_field, overrides)
    run_recipe(recipe, out)
    return out


def is_classifier(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` is an lmforge classifier (a backbone under a task head)."""
    try:
        return (resolve_checkpoint(checkpoint) / HEAD_CONFIG).is_file()
    except UserError:  # not an lmforge checkpoint (a Hugging Face directory, a GGUF file, a catalog name)
        return False


def check_settings(method: str, sparsity: float | None, pattern: str, calib: str | None, drop_blocks: int,
                   recover_steps: int, recover_data: str | None, recover_method: str, calib_samples: int,
                   calib_tokens: int) -> tuple[float, tuple[int, int] | None]:
    """The sparsity to reach and the N:M pattern (None for the others); a UserError for settings that
    cannot work, before anything is read."""
    nm = None
    if match := PATTERN.fullmatch(pattern):
        nm = int(match.group(1)), int(match.group(2))
        if not 0 < nm[0] < nm[1]:
            raise UserError(f"--pattern {pattern}: expected N:M with 0 < N < M, such as 2:4")
        if sparsity is not None and not math.isclose(sparsity, nm[0] / nm[1]):
            raise UserError(f"--sparsity {sparsity} contradicts --pattern {pattern} ({nm[0] / nm[1]:g} of the "
                            f"weights); leave --sparsity out")
        sparsity = nm[0] / nm[1]
    elif pattern not in ("unstructured", "structured"):
        raise UserError(f"--pattern = {pattern!r}; expected unstructured, structured or N:M such as 2:4")
    if sparsity is None:
        raise UserError(f"--pattern {pattern} needs --sparsity S, the share to prune in [0, 1)")
    if not 0 <= sparsity < 1:
        raise UserError(f"--sparsity = {sparsity}; expected a share in [0, 1)")
    if method == "wanda" and not calib:
        raise UserError("--method wanda scores weights by their inputs on calibration text: give --calib DATA "
                        "(a file, folder or catalog name such as kjv), or use --method magnitude")
    if drop_blocks < 0:
        raise UserError(f"--drop-blocks = {drop_blocks}; expected 0 or more")
    if drop_blocks and pattern != "structured":
        raise UserError("--drop-blocks removes whole blocks: it goes with --pattern structured")
    if drop_blocks and not calib:
        raise UserError("--drop-blocks ranks blocks by how much they change their input on calibration text: "
                        "give --calib DATA")
    if recover_steps < 0:
        raise UserError(f"--recover-steps = {recover_steps}; expected 0 or more")
    if recover_steps and not (recover_data or calib):
        raise UserError("--recover-steps trains on text: give --recover-data DATA (or --calib DATA)")
    if recover_steps and recover_method == "lora" and pattern != "structured":
        raise UserError(f"--recover-method lora would fill in the zeros of a {pattern} mask (its update is "
                        "dense); use --recover-method full, which keeps them at zero")
    if calib_samples < 1 or calib_tokens < 2:
        raise UserError(f"--calib-samples = {calib_samples}, --calib-tokens = {calib_tokens}; expected >= 1 "
                        "and >= 2")
    return sparsity, nm


# ----------------------------------------------------------------------------------------------
# what the calibration text says about each part


@torch.no_grad()
def calibration_statistics(model: Decoder, sequences: torch.Tensor, layers: list[str], heads: bool = False,
                           blocks: bool = False, batch_size: int = 4) -> dict[str, Any]:
    """One pass over the calibration sequences, with hooks:
    - `inputs[name]`: the sum of squares of each input of each named linear layer (in_features,);
    - `heads[i]` (heads=True): the squared norm of each query head's share of block i's attention output;
    - `influence[i]` (blocks=True): block i's mean 1 - cosine(output, input) over the tokens."""
    stats: dict[str, Any] = {"inputs": {}, "heads": {}, "influence": {}}
    handles = []

    def add_inputs(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            stats["inputs"][name] = stats["inputs"].get(name, 0) + x.pow(2).sum(0)
        return hook

    def add_heads(index: int, attention: nn.Module):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            y = args[0].reshape(-1, attention.n_head, attention.head_dim).float()  # (N, nh, hd)
            w = module.weight.float().view(-1, attention.n_head, attention.head_dim)  # (d, nh, hd)
            share = torch.einsum("nhk,dhk->hnd", y, w)  # each head's part of proj's output
            stats["heads"][index] = stats["heads"].get(index, 0) + share.pow(2).sum((1, 2))
        return hook

    def add_influence(index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            x, y = args[0].reshape(-1, args[0].shape[-1]).float(), output.reshape(-1, output.shape[-1]).float()
            change = (1 - nn.functional.cosine_similarity(x, y, dim=-1)).sum()
            stats["influence"][index] = stats["influence"].get(index, 0) + change.item()
        return hook

    for name in layers:
        handles.append(model.get_submodule(name).register_forward_pre_hook(add_inputs(name)))
    for i, block in enumerate(model.blocks):
        if heads:
            handles.append(block.attn.proj.register_forward_pre_hook(add_heads(i, block.attn)))
        if blocks:
            handles.append(block.register_forward_hook(add_influence(i)))
    calibration_pass(model, sequences, handles, batch_size)
    stats["influence"] = {i: v / sequences.numel() for i, v in stats["influence"].items()}
    return stats


# ----------------------------------------------------------------------------------------------
# masks: unstructured and N:M


def block_linears(model: Decoder) -> list[str]:
    """The names of the linear layers of the blocks (what masks prune; not the embedding or the head)."""
    return [name for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear)]


def row_parts(name: str, config: ModelConfig) -> list[int]:
    """The rows of each layer that lmforge fuses into one weight: [q, k, v] of qkv, [gate, up] of a
    SwiGLU's up; one part for the others."""
    if name.endswith("attn.qkv"):
        q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        return [q, kv, kv]
    if name.endswith("mlp.up") and config.mlp == "swiglu":
        return [config.d_ff, config.d_ff]
    return []


@torch.no_grad()
def prune_masks(model: Decoder, sparsity: float, method: str, nm: tuple[int, int] | None,
                sequences: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{layer name: bool mask (True = kept)} of every linear layer of the blocks."""
    layers = block_linears(model)
    if nm is not None:
        bad = [n for n in layers if model.get_submodule(n).in_features % nm[1]]
        if bad:
            raise UserError(f"--pattern {nm[0]}:{nm[1]} needs layers whose inputs divide into groups of {nm[1]}; "
                            f"{bad[0]} has {model.get_submodule(bad[0]).in_features}")
    inputs = calibration_statistics(model, sequences, layers)["inputs"] if method == "wanda" else {}
    masks = {}
    for name in layers:
        weight = model.get_submodule(name).weight.float()
        score = weight.abs() * inputs[name].sqrt()[None] if method == "wanda" else weight.abs()
        if nm is not None:
            masks[name] = nm_mask(score, *nm)
        elif method == "wanda":
            masks[name] = lowest_mask(score, sparsity, per_row=True)  # within each output row, as the paper does
        else:
            parts = row_parts(name, model.config) or [weight.shape[0]]
            masks[name] = torch.cat([lowest_mask(s, sparsity) for s in score.split(parts)])
    return masks


def lowest_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """True but for the round(sparsity * n) lowest scores of the whole tensor, or of each row."""
    if per_row:
        mask = torch.ones_like(score, dtype=torch.bool)
        return mask.scatter_(1, score.argsort(dim=1)[:, :round(sparsity * score.shape[1])], False)
    mask = torch.ones(score.numel(), dtype=torch.bool)
    mask[score.flatten().argsort()[:round(sparsity * score.numel())]] = False
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True but for the n lowest scores of every m consecutive inputs of each row."""
    groups = score.reshape(score.shape[0], -1, m)  # (out, in / m, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.argsort(dim=2)[..., :n], False)
    return mask.view_as(score)


def nonzero_parameters(model: nn.Module) -> int:
    """Parameters that are not zero (the tied head counted once, as in num_parameters)."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# structured: a smaller model


def block_parameters(config: ModelConfig) -> int:
    """The parameters of one block of `config` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Block(config, 0).parameters())


def plan_width(config: ModelConfig, keep: float) -> tuple[int, int]:
    """(query heads, MLP width) of a block that keeps about `keep` of its parameters: heads cut in the
    same share (the same number in every key/value group), the MLP making up the rest."""
    groups, per_group = config.n_kv_head, config.n_head // config.n_kv_head
    if per_group > 1:  # grouped-query attention: the same number of query heads in every group
        n_head = groups * max(1, math.floor(per_group * keep + 0.5))
    else:  # multi-head attention: whole heads (each its own key/value group)
        n_head = max(1, math.floor(config.n_head * keep + 0.5))
    align = 32 if config.d_ff % 32 == 0 else 1
    kv = n_head if per_group == 1 else groups
    at = {d_ff: block_parameters(config_with(config, n_head=n_head, n_kv_head=kv, d_ff=d_ff))
          for d_ff in (align, 2 * align)}
    per_neuron = (at[2 * align] - at[align]) / align
    target = keep * block_parameters(config)
    d_ff = align * round((align + (target - at[align]) / per_neuron) / align)
    return n_head, min(config.d_ff, max(align, d_ff))


def config_with(config: ModelConfig, **sizes: int) -> ModelConfig:
    """A copy of `config` with other sizes (head_dim kept)."""
    return ModelConfig(**{**to_dict(config), "head_dim": config.head_dim, **sizes}).validate()


@torch.no_grad()
def prune_structured(model: Decoder, sparsity: float, method: str, sequences: torch.Tensor | None,
                     drop_blocks: int) -> tuple[Decoder, dict[str, Any]]:
    """The smaller model and what was cut: `drop_blocks` blocks, then the same heads and MLP share of
    every block, so that `sparsity` of the blocks' parameters go."""
    config = model.config
    if drop_blocks >= config.n_layer:
        raise UserError(f"--drop-blocks {drop_blocks}: the model has {config.n_layer} blocks; keep at least one")
    keep_blocks = config.n_layer - drop_blocks
    keep = (1 - sparsity) * config.n_layer / keep_blocks  # the share of each remaining block's parameters
    if keep > 1 + 1e-9:
        raise UserError(f"--drop-blocks {drop_blocks} removes {drop_blocks / config.n_layer:.0%} of the blocks' "
                        f"parameters, more than --sparsity {sparsity}; drop fewer blocks or prune more")
    stats = None
    if method == "wanda":
        stats = calibration_statistics(model, sequences, [f"blocks.{i}.mlp.down" for i in range(config.n_layer)],
                                       heads=True, blocks=drop_blocks > 0)
    elif drop_blocks:
        stats = calibration_statistics(model, sequences, [], blocks=True)
    influence = stats["influence"] if drop_blocks else {}
    kept_blocks = sorted(sorted(range(config.n_layer), key=lambda i: influence[i], reverse=True)[:keep_blocks]) \
        if drop_blocks else list(range(config.n_layer))
    n_head, d_ff = plan_width(config, min(keep, 1.0))
    n_kv_head = config.n_kv_head if config.n_head // config.n_kv_head > 1 else n_head
    small = config_with(config, n_layer=keep_blocks, n_head=n_head, n_kv_head=n_kv_head, d_ff=d_ff)
    state = model.state_dict()
    new_state = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for new_index, old in enumerate(kept_blocks):
        block = model.blocks[old]
        heads = kept_heads(block, config, n_head, stats["heads"][old] if stats and stats["heads"] else None)
        neurons = kept_neurons(block, d_ff, stats["inputs"].get(f"blocks.{old}.mlp.down") if stats else None)
        for key, value in cut_block(block, config, heads, neurons).items():
            new_state[f"blocks.{new_index}.{key}"] = value
    smaller = Decoder(small)
    smaller.load_state_dict(new_state)
    smaller.tokenizer = model.tokenizer
    cut = {"from": {"n_layer": config.n_layer, "n_head": config.n_head, "n_kv_head": config.n_kv_head,
                    "d_ff": config.d_ff},
           "blocks_removed": [i for i in range(config.n_layer) if i not in kept_blocks]}
    return smaller.eval(), cut


def kept_heads(block: Block, config: ModelConfig, n_head: int, importance: torch.Tensor | None) -> list[int]:
    """The query heads to keep (in order): the most important ones, the same number in every key/value group
    (of multi-head attention: the most important heads)."""
    if importance is None:  # magnitude: the norm of each head's query rows times that of its output columns
        hd = config.head_dim
        q = block.attn.qkv.weight[: config.n_head * hd].view(config.n_head, -1).norm(dim=1)
        o = block.attn.proj.weight.view(-1, config.n_head, hd).pow(2).sum((0, 2)).sqrt()
        importance = q * o
    per_group = config.n_head // config.n_kv_head
    if per_group == 1:
        return sorted(importance.argsort(descending=True)[:n_head].tolist())
    keep = n_head // config.n_kv_head
    kept = []
    for group in range(config.n_kv_head):
        members = importance[group * per_group:(group + 1) * per_group]
        kept += sorted((group * per_group + members.argsort(descending=True)[:keep]).tolist())
    return kept


def kept_neurons(block: Block, d_ff: int, inputs: torch.Tensor | None) -> list[int]:
    """The MLP neurons to keep (in order): the largest contributions ||X_j|| * ||W_down[:, j]||, or with
    no calibration ||W_up[j]|| * ||W_down[:, j]||."""
    down = block.mlp.down.weight.float().norm(dim=0)
    if inputs is not None:
        importance = inputs.sqrt() * down
    else:
        up = block.mlp.up.weight.float()
        importance = up.view(-1 if block.mlp.swiglu is None else 2, down.numel(), up.shape[1]).norm(dim=(0, 2)) * down
    return sorted(importance.argsort(descending=True)[:d_ff].tolist())


def cut_block(block: Block, config: ModelConfig, heads: list[int], neurons: list[int]) -> dict[str, torch.Tensor]:
    """The weights of `block` (its state_dict's names) keeping only the given query heads and MLP neurons;
    of multi-head attention, the heads' keys and values go with them."""
    hd, q = config.head_dim, config.n_head * config.head_dim
    kv = config.n_kv_head * hd
    rows = lambda units, offset=0: torch.cat([torch.arange(offset + u * hd, offset + (u + 1) * hd)  # noqa: E731
                                              for u in units])
    kv_heads = heads if config.n_head == config.n_kv_head else range(config.n_kv_head)
    qkv_rows = torch.cat([rows(heads), rows(kv_heads, q), rows(kv_heads, q + kv)])
    neurons_t = torch.tensor(neurons)
    up_rows = torch.cat([neurons_t, neurons_t + config.d_ff]) if block.mlp.swiglu is not None else neurons_t
    state = block.state_dict()
    cut = {"attn.qkv.weight": state["attn.qkv.weight"][qkv_rows],
           "attn.proj.weight": state["attn.proj.weight"][:, rows(heads)],
           "mlp.up.weight": state["mlp.up.weight"][up_rows],
           "mlp.down.weight": state["mlp.down.weight"][:, neurons_t]}
    if "attn.qkv.bias" in state:
        cut["attn.qkv.bias"] = state["attn.qkv.bias"][qkv_rows]
    if "mlp.up.bias" in state:
        cut["mlp.up.bias"] = state["mlp.up.bias"][up_rows]
    return {**state, **cut}


# ----------------------------------------------------------------------------------------------
# recovery: the fine-tuning recipe on the pruned model


class Recovery(Finetune):
    """Fine-tuning of the pruned model in memory on text, into the run directory `out`; the model as pruned
    is saved first in `out/pruned` (LoRA's base), and a mask's zeros stay zero (their gradients are masked)."""

    name = "prune"

    def __init__(self, model: Decoder, data: str, out: Path, method: str, steps: int,
                 masks: dict[str, torch.Tensor], info: dict[str, Any], max_length: int, text_field: str,
                 overrides: dict[str, Any] | None):
        self.pruned_dir = out.resolve() / "pruned"
        super().__init__(model, data, method, epochs=None, val_fraction=0.05, data_format="text",
                         text_field=text_field, max_length=max_length,
                         overrides={**(overrides or {}), "train.max_steps": steps}, base=str(self.pruned_dir))
        self.masks, self.info = masks, info

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "pruning": {k: v for k, v in self.model.pruning.items() if k != "layers"}}

    def build(self) -> Job:
        save_checkpoint(self.pruned_dir, self.model, info=self.info)
        job = super().build()
        for name, mask in self.masks.items():
            self.model.get_submodule(name).weight.register_hook(lambda grad, mask=mask: grad * mask)
        job.info.update(self.info)
        return job


def describe(record: dict[str, Any], info: dict[str, Any]) -> str:
    """One line: what was pruned and what is left."""
    before, after, nonzero = info["parameters_before"], info["parameters"], info["nonzero_parameters"]
    if record["pattern"] == "structured":
        return (f"{before:,} -> {after:,} parameters ({1 - after / before:.1%} fewer; blocks removed: "
                f"{record['blocks_removed'] or 'none'})")
    return f"{before - nonzero:,} of {before:,} parameters are zero ({(before - nonzero) / before:.1%})"


def pruned(result: Path, arguments: dict[str, Any]) -> str:
    """What `lmforge prune` prints when it is done."""
    where = f"the run in {result} (its best checkpoint; the model before recovery in {result}/pruned)" \
        if arguments.get("recover_steps") else str(result)
    return f"wrote the pruned model ({arguments['pattern']}, {arguments['method']}) to {where}"
