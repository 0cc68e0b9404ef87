"""The checkpoint directory: the one format every lmforge model is saved in and loaded from.

    CHECKPOINT/
      config.json        the ModelConfig (kind and sizes)
      model.safetensors  the weights (fp32)
      tokenizer.json     the tokenizer
      tokenizer_config.json  its eos/bos tokens and chat template (Hugging Face style; only when it has them)
      lmforge.json       versions, data fingerprint, training summary, or where an imported model came from
      trainer_state.pt   optimizer, step and RNG states (only where a run can be resumed)

A LoRA fine-tuning checkpoint holds `adapter_model.safetensors` and `adapter_config.json` (peft's
format) instead of the weights, and names its base model in lmforge.json (`base`).

A checkpoint is written to a temporary directory beside its destination and renamed into place,
so a crash never leaves a half-written checkpoint. Loading reads safetensors and JSON, and
`torch.load(weights_only=True)`: no pickled code is ever run.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.config import MODEL_KINDS, ModelConfig, from_dict, to_dict
from lmforge.errors import UserError
from lmforge.files import atomic_directory
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer

CONFIG, WEIGHTS, TOKENIZER, INFO, TRAINER_STATE = (
    "config.json", "model.safetensors", "tokenizer.json", "lmforge.json", "trainer_state.pt"
)
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def versions() -> dict[str, str]:
    from lmforge import __version__

    return {"lmforge": __version__, "torch": torch.__version__, "python": platform.python_version()}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None = None,
    info: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (or `state_dict`, e.g. fp32 master weights) and friends to `directory`, atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        weights = state_dict if state_dict is not None else model.state_dict()
        weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
        if hasattr(model, "save_head"):  # a task head on a backbone (a classifier): the head writes its own files
            weights = model.save_head(tmp, weights)  # and returns the backbone's weights, saved below as usual
            model = model.backbone
        if hasattr(model, "peft_config"):  # LoRA: only the adapters, in peft's own format
            from peft import get_peft_model_state_dict

            save_file(get_peft_model_state_dict(model, state_dict=weights), tmp / ADAPTER_WEIGHTS)
            model.peft_config["default"].save_pretrained(tmp)
        else:
            save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
        if isinstance(model.config, ModelConfig):
            (tmp / CONFIG).write_text(json.dumps(to_dict(model.config), indent=2) + "\n")
        else:  # a transformers model with no native port: its config.json, so transformers loads the directory
            (tmp / CONFIG).write_text(model.config.to_json_string())
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)  # and tokenizer_config.json beside it when there is metadata
        (tmp / INFO).write_text(json.dumps({"versions": versions(), **(info or {})}, indent=2) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for `path`: itself, or inside a run directory the `best/` checkpoint
    (kept by fine-tuning) or else the last one, `checkpoint/`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such checkpoint: {path}")
    if (path / CONFIG).is_file():
        return path
    for inner in ("best", "checkpoint"):
        if (path / inner / CONFIG).is_file():
            return path / inner
    raise UserError(f"{path} is not an lmforge checkpoint (no {CONFIG}; expected a directory written by "
                    f"lmforge pretrain or lmforge import)")


def read_model_config(directory: Path) -> ModelConfig:
    try:
        values = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{directory / CONFIG} is not valid JSON: {e}") from None
    kind = values.get("kind", "decoder")
    if kind not in MODEL_KINDS:
        raise UserError(f"{directory / CONFIG}: model kind {kind!r} is not supported; "
                        f"supported: {', '.join(MODEL_KINDS)}")
    return from_dict(ModelConfig, values, str(directory / CONFIG)).validate()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load the model of a checkpoint directory (or run directory), with its tokenizer attached.

    The class follows the config's `kind`: a Decoder, a Seq2Seq or a VAE (`lmforge.models.build_model`).
    """
    directory = resolve_checkpoint(path)
    config = read_model_config(directory)
    if not (directory / WEIGHTS).is_file():
        raise UserError(f"{directory} has no {WEIGHTS}")
    with torch.device("meta"):
        model = build_model(config)
    state = load_file(directory / WEIGHTS, device=str(device))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    resized = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or resized:
        raise UserError(f"{directory / WEIGHTS} does not match {CONFIG}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, of other sizes {resized[:3]}")
    model.load_state_dict(state, assign=True)
    if dtype is not None:
        model.to(dtype)
    if (directory / TOKENIZER).is_file():
        model.tokenizer = Tokenizer.load(directory)  # tokenizer.json + tokenizer_config.json
        if model.tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"{directory / TOKENIZER} has {model.tokenizer.vocab_size} tokens but the model "
                            f"has {config.vocab_size}; the tokenizer does not belong to this model")
    return model.eval()


def read_info(path: str | Path) -> dict[str, Any]:
    directory = resolve_checkpoint(path)
    return json.loads((directory / INFO).read_text()) if (directory / INFO).is_file() else {}


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
