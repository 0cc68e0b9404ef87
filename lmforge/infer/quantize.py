"""Weight-only quantization of a model's linear layers: int8 per channel or int4 in groups, RTN or GPTQ.

    lmforge quantize runs/x --bits 4 --group-size 32 --method gptq --calib kjv --out runs/x-int4
    lmforge.quantize("runs/x", "runs/x-int8", bits=8)          # round to nearest, no calibration
    model = lmforge.load("runs/x-int4")                         # generate, chat, eval work on it unchanged

Every linear layer of the blocks becomes a `lmforge.kernels.quantized.QuantizedLinear` (its storage
and kernels are described there); the output head too, at `head_bits` (8 by default: the head
writes every logit, and at 49K tokens it is a fifth of a small model's weights), or stays in float
with `head_bits=0`. The token embedding stays in float (a lookup reads one row a token).

Methods:
- `rtn`: each weight rounded to the nearest point of its grid (int8: symmetric per output channel;
  int4: asymmetric per group of `group_size` inputs).
- `gptq` (Frantar et al. 2022, "GPTQ: accurate post-training quantization for generative pre-trained
  transformers"): columns are quantized one by one, and each one's rounding error is spread over
  the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's inputs
  on calibration text (`calib`), so that the layer's *outputs* on such text change least. The inputs
  of every layer are collected in one pass through the float model (not layer by layer through the
  already-quantized ones: simpler, and within noise of the sequential variant at this size).

The checkpoint records the quantization in config.json (`quantization`: bits, group size, method,
head bits, the layers); `lmforge.load` builds the quantized layers from it. Quantizing a quantized
checkpoint, a group size that does not divide a layer's inputs, GPTQ without calibration text: one-line
errors, nothing written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge import crypto
from lmforge.data.sources import calibration_sequences
from lmforge.errors import UserError
from lmforge.files import check_new_directory
from lmforge.kernels.quantized import QuantizedLinear, int4_codes, int4_grid, int8_codes, int8_scales
from lmforge.recipes.classify import DEFAULT_MAX_LENGTH, HEAD_CONFIG, HEAD_WEIGHTS, Classifier
from lmforge.sources import load
from lmforge.train.checkpoint import load_tensors, resolve_checkpoint, save_checkpoint
from lmforge.train.objectives import calibration_pass

HEAD = "head"


def quantize(
    checkpoint: str | Path,
    out: str | Path,
    bits: Literal[4, 8] = 4,
    group_size: int = 32,
    method: Literal["rtn", "gptq"] = "rtn",
    calib: str | None = None,
    head_bits: Literal[0, 4, 8] = 8,
    calib_samples: int = 32,
    calib_tokens: int = 256,
    text_field: str = "text",
) -> Path:
    """Quantize a model's linear layers to int8 or int4 (weight-only): a smaller, faster checkpoint.

    Every verb loads the result like any checkpoint (generate, chat, eval, classify, export). Returns
    the directory.

    Args:
        checkpoint: a checkpoint or run directory (or any model lmforge.load takes)
        out: the checkpoint directory to create
        bits: 8 (per output channel) or 4 (in groups of --group-size inputs)
        group_size: int4: inputs that share one scale and zero point (32, 64 or 128; smaller is closer)
        method: rtn (round to nearest) or gptq (calibrated on --calib text: each column's rounding error
            is made up for by the columns after it)
        calib: gptq: the calibration text, a file, folder or glob of txt/jsonl/csv/parquet files, or a
            catalog name (kjv, shakespeare)
        head_bits: the output head's bits (8, 4, or 0 to keep it in float)
        calib_samples: gptq: the calibration sequences
        calib_tokens: gptq: the tokens of each calibration sequence (at most the model's context)
        text_field: the jsonl field / csv or parquet column of the calibration text
    """
    out = Path(out)
    check_new_directory(out)
    if group_size < 2 or group_size % 2:
        raise UserError(f"--group-size = {group_size}; expected an even number such as 32, 64 or 128")
    if method == "gptq" and not calib:
        raise UserError("--method gptq needs calibration text: --calib DATA (a file, folder or catalog name "
                        "such as kjv)")
    if method == "rtn" and calib:
        raise UserError("--calib is for --method gptq; rtn needs no calibration text")
    if calib_samples < 1 or calib_tokens < 2:
        raise UserError(f"--calib-samples = {calib_samples}, --calib-tokens = {calib_tokens}; expected >= 1 and >= 2")
    model = load(checkpoint)
    if getattr(model, "quantization", None):
        raise UserError(f"{checkpoint} is quantized already ({model.quantization['bits']} bits); quantize "
                        "the float checkpoint it was made from")
    plan = layer_plan(model, bits, head_bits, group_size)
    parameters = model.num_parameters()
    hessians = None
    if method == "gptq":
        if getattr(model.config, "kind", "decoder") != "decoder":
            raise UserError(f"--method gptq calibrates decoders (causal LMs); {checkpoint} is a "
                            f"{model.config.kind} model: use --method rtn")
        tokenizer = model.tokenizer
        sequences = calibration_sequences(calib, tokenizer, calib_samples,
                                          min(calib_tokens, model.config.block_size), text_field)
        hessians = collect_hessians(model, plan, sequences)
    quantize_model(model, plan, group_size, hessians)
    model.quantization = {"bits": bits, "group_size": group_size, "method": method, "head_bits": head_bits,
                          **({"calibration": {"data": str(calib), "samples": calib_samples,
                                              "tokens": calib_tokens}} if calib else {}),
                          "layers": plan}
    summary = {k: v for k, v in model.quantization.items() if k != "layers"}
    save_checkpoint(out, with_classifier_head(model, checkpoint),
                    info={"quantized_from": str(checkpoint), "parameters": parameters, "quantization": summary})
    return out


def with_classifier_head(backbone: nn.Module, checkpoint: str | Path) -> nn.Module:
    """The quantized backbone under its classifier head where `checkpoint` is a classifier (the head stays
    in float: a few thousand weights), else the backbone itself."""
    path = Path(checkpoint)
    if not path.is_dir():
        return backbone
    directory = resolve_checkpoint(path)
    if not (directory / HEAD_CONFIG).is_file():
        return backbone
    config = json.loads(crypto.read_bytes(directory / HEAD_CONFIG))
    classifier = Classifier(backbone, config["labels"], config.get("max_length", DEFAULT_MAX_LENGTH))
    classifier.head.load_state_dict(load_tensors(directory / HEAD_WEIGHTS))
    return classifier


def layer_plan(model: nn.Module, bits: int, head_bits: int, group_size: int) -> dict[str, int]:
    """{layer name: bits} for every linear layer to quantize; a UserError where a group size does not fit."""
    plan = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        layer_bits = head_bits if name == HEAD or name.endswith("." + HEAD) else bits
        if not layer_bits:
            continue
        if layer_bits == 4 and module.in_features % group_size:
            raise UserError(f"--group-size {group_size} does not divide the {module.in_features} inputs of layer "
                            f"{name}; choose one that does (e.g. {math.gcd(module.in_features, 128)})")
        plan[name] = layer_bits
    if not plan:
        raise UserError("the model has no linear layers to quantize")
    return plan


@torch.no_grad()
def collect_hessians(model: nn.Module, plan: dict[str, int], sequences: torch.Tensor,
                     batch_size: int = 4) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n of the inputs X of each planned layer over the calibration sequences (one pass)."""
    modules = dict(model.named_modules())
    hessians = {name: torch.zeros(modules[name].in_features, modules[name].in_features) for name in plan}
    rows = dict.fromkeys(plan, 0)

    def hook(name: str):
        def add(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            hessians[name].addmm_(x.T, x, alpha=2.0)
            rows[name] += x.shape[0]
        return add

    calibration_pass(model, sequences, [modules[name].register_forward_pre_hook(hook(name)) for name in plan],
                     batch_size)
    return {name: h / max(rows[name], 1) for name, h in hessians.items()}


@torch.no_grad()
def quantize_model(model: nn.Module, plan: dict[str, int], group_size: int,
                   hessians: dict[str, torch.Tensor] | None = None) -> None:
    """Replace each planned layer by its QuantizedLinear: GPTQ where `hessians` are given, else RTN."""
    for name, bits in plan.items():
        linear = model.get_submodule(name)
        group = group_size if bits == 4 else None
        if hessians is None:
            layer = QuantizedLinear.from_weight(linear.weight, linear.bias, bits, group)
        else:
            layer = QuantizedLinear(linear.in_features, linear.out_features, bits, group, linear.bias is not None)
            layer.set_codes(*gptq(linear.weight.float(), hessians[name], bits, layer.group_size))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.float())
        model.set_submodule(name, layer)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, block: int = 128,
         damping: float = 0.01) -> tuple[torch.Tensor, ...]:
    """GPTQ's codes and grid for a weight (out, in) given the Hessian (in, in) of its inputs: int8 (codes,
    scales) or int4 (codes, scales, zeros), as `QuantizedLinear.set_codes` takes them.

    The algorithm of Frantar et al. (their reference implementation's lazy block updates): with
    H^-1 = U^T U (Cholesky), column j's rounding error e_j = (w_j - q_j) / U_jj is taken off the later
    columns as e_j * U_j,k. int4 grids are set per group from the weights as updated so far.
    """
    W = weight.clone()
    out_features, n = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any value does
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damping * torch.mean(torch.diag(H)) * torch.eye(n)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:  # not positive definite even damped: round to nearest
        U = torch.eye(n)
    codes = torch.zeros(out_features, n, dtype=torch.int8 if bits == 8 else torch.uint8)
    if bits == 8:
        scales = int8_scales(W)
    else:
        scales = torch.zeros(out_features, n // group_size)
        zeros = torch.zeros(out_features, n // group_size)
    block = max(block // group_size, 1) * group_size if bits == 4 else block  # whole groups per block
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(out_features, i2 - i1), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if bits == 4 and column % group_size == 0:
                g = column // group_size
                scales[:, g:g + 1], zeros[:, g:g + 1] = int4_grid(W1[:, i:i + group_size], group_size)
            w = W1[:, i:i + 1]
            if bits == 8:
                q = int8_codes(w, scales)
                rounded = q.float() * scales[:, None]
            else:
                s, z = scales[:, g:g + 1], zeros[:, g:g + 1]
                q = int4_codes(w, s, z)
                rounded = (q.float() - 8) * s + z
            codes[:, column:column + 1] = q
            error = (w - rounded) / U1[i, i]
            W1[:, i:] -= error @ U1[i:i + 1, i:]
            E1[:, i:i + 1] = error
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return (codes, scales) if bits == 8 else (codes, scales, zeros)
