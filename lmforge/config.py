"""Configuration: typed dataclasses, named presets, YAML in and out, and validation.

There is one config system. `ModelConfig` says what a model is (its kind and sizes; it is the
`config.json` of every checkpoint); `TrainConfig` says how a run trains. Each field carries its help
text, which becomes the `--model.FIELD` / `--train.FIELD` flags of the CLI and the docs of YAML
files. `load_run_config` merges, in order: preset, YAML file, flags.

    model = preset("gpt-mini")                      # a ModelConfig
    model, train = load_run_config("gpt-mini", "run.yaml", {"train.lr": 3e-4})
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lmforge.devices import DEVICE_HELP, check_device_name
from lmforge.errors import UserError

NoneType = type(None)


def param(default: Any, help: str, dotted: bool = False) -> Any:
    """A dataclass field with its help text (shown by `--help` and written into docs). `dotted`: on the
    command line the field's first underscore may also be a dot (`dp_epsilon`: `--train.dp.epsilon`)."""
    return field(default=default, metadata={"help": help, "dotted": dotted})


MODEL_KINDS = ("decoder", "seq2seq", "vae", "cvae")


@dataclass
class ModelConfig:
    """The architecture of a model: stored as `config.json` in every checkpoint."""

    kind: str = param("decoder", "model kind: decoder (causal LM), seq2seq (encoder-decoder with cross-attention), "
                                 "vae (variational autoencoder LM) or cvae (conditional VAE: seq2seq with a latent)")
    vocab_size: int = param(8192, "number of token ids (set from the tokenizer when training)")
    block_size: int = param(256, "context length in tokens")
    n_layer: int = param(6, "number of Transformer blocks")
    n_head: int = param(6, "attention heads (queries)")
    n_kv_head: int | None = param(None, "key/value heads for grouped-query attention (default: n_head)")
    head_dim: int | None = param(None, "width of each attention head (default: d_model / n_head; a model with "
                                       "pruned heads keeps its head width)")
    d_model: int = param(384, "width of the residual stream")
    d_ff: int | None = param(None, "hidden width of the MLP (default: 4*d_model, or ~8/3*d_model for swiglu)")
    norm: str = param("layernorm", "layernorm (GPT-2) or rmsnorm (Llama)")
    mlp: str = param("gelu", "gelu (GPT-2, tanh approximation) or swiglu (Llama)")
    position: str = param("learned", "learned absolute positions (GPT-2) or rope (Llama)")
    rope_theta: float = param(10000.0, "RoPE base frequency")
    bias: bool = param(True, "biases in linear layers and norms")
    qkv_bias: bool | None = param(None, "biases on the q/k/v projections only (default: same as bias)")
    tie_embeddings: bool = param(True, "share the token embedding with the output head")
    norm_eps: float = param(1e-5, "epsilon of the normalisation layers")
    dropout: float = param(0.0, "dropout probability in training")
    n_encoder_layer: int | None = param(None, "seq2seq, vae, cvae: blocks of the encoder (default: n_layer)")
    share_embeddings: bool = param(True, "seq2seq, cvae: one token embedding for the encoder and the decoder")
    latent_dim: int = param(32, "vae, cvae: dimensions of the latent variable z")

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None and self.n_head > 0:
            self.head_dim = self.d_model // self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.d_ff is None:
            if self.mlp == "swiglu":
                self.d_ff = 64 * -(-(8 * self.d_model // 3) // 64)  # round up to a multiple of 64
            else:
                self.d_ff = 4 * self.d_model

    def validate(self) -> ModelConfig:
        choices = {"kind": MODEL_KINDS, "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "position": ("learned", "rope")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name} = {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise UserError(f"model.{name} = {getattr(self, name)}; expected a positive integer")
        if self.d_model % self.n_head and self.head_dim == self.d_model // self.n_head:
            raise UserError(f"model.d_model = {self.d_model} is not divisible by model.n_head = {self.n_head}; "
                            "set model.head_dim for heads narrower than d_model / n_head")
        if self.n_head % self.n_kv_head:
            raise UserError(f"model.n_head = {self.n_head} is not divisible by model.n_kv_head = {self.n_kv_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"rope needs an even head size; model.head_dim = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout = {self.dropout}; expected a value in [0, 1)")
        for name in ("n_encoder_layer", "latent_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"model.{name} = {getattr(self, name)}; expected a positive integer")
        return self

    @property
    def encoder_layers(self) -> int:
        """Blocks of the encoder of a seq2seq or vae model."""
        return self.n_encoder_layer or self.n_layer


@dataclass
class TrainConfig:
    """How a run trains: the optimizer, schedule, batch, precision and bookkeeping."""

    batch_size: int = param(8, "sequences per optimizer step, over all processes and accumulation steps")
    grad_accum: int = param(1, "micro-batches per optimizer step (each batch_size / grad_accum / world)")
    max_steps: int = param(1000, "optimizer steps in the run (sets the length of the cosine schedule)")
    max_minutes: float | None = param(None, "stop (and save) after this many minutes of training")
    lr: float = param(1e-3, "peak learning rate")
    min_lr: float = param(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = param(100, "steps of linear warmup")
    schedule: str = param("cosine", "cosine (decay to min_lr at max_steps) or wsd (warmup, stable, then a linear "
                                    "warm-down to min_lr over the last decay_fraction of the run)")
    decay_fraction: float = param(0.4, "wsd: the share of the run spent in the warm-down")
    optimizer: str = param("adamw", "adamw, or muon (Muon on the hidden layers' matrices at muon_lr, AdamW at lr "
                                     "on embeddings, head, norms and biases)")
    muon_lr: float = param(0.02, "muon: the peak learning rate of the matrices Muon updates")
    weight_decay: float = param(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = param(0.9, "AdamW beta1")
    beta2: float = param(0.95, "AdamW beta2")
    grad_clip: float = param(1.0, "clip the global gradient norm to this (0 = off)")
    precision: str = param("auto", "auto (the faster of bf16 and fp32 on this hardware), fp32, bf16 (bf16 weights "
                                   "with fp32 master copies) or fp16 (autocast with loss scaling)")
    eval_interval: int = param(200, "evaluate (and save) every this many steps")
    eval_batches: int = param(20, "batches per evaluation")
    log_interval: int = param(10, "write metrics every this many steps")
    patience: int | None = param(None, "stop when validation loss has not improved for this many evaluations")
    keep_best: bool = param(False, "also keep the checkpoint of the best validation loss in OUT/best")
    seed: int = param(1337, "seed for initialisation and batch order")
    device: str = param("auto", DEVICE_HELP)
    compile: bool = param(False, "torch.compile the model")
    activation_checkpointing: bool = param(False, "recompute each block's activations in the backward pass: "
                                                  "far less memory, about a third more compute")
    strategy: str = param("ddp", "under torchrun: ddp (each process holds the whole model) or fsdp (FSDP2: "
                                 "parameters, gradients and AdamW state sharded over the processes, for models "
                                 "that do not fit one device; checkpoints sharded until the last)")
    dp_epsilon: float | None = param(None, "differential privacy (DP-SGD through Opacus): the privacy budget epsilon "
                                           "the whole run may spend; batches are Poisson-sampled (batch_size is "
                                           "their expected size), each example's gradient clipped, noise added "
                                           "(lmforge.train.privacy)", dotted=True)
    dp_delta: float | None = param(None, "DP: delta of (epsilon, delta)-DP (default: 1 / the number of training "
                                         "examples)", dotted=True)
    dp_max_grad_norm: float = param(1.0, "DP: each example's gradient is clipped to this L2 norm", dotted=True)

    def validate(self) -> TrainConfig:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} = {getattr(self, name)}; expected a positive integer")
        if self.batch_size % self.grad_accum:
            raise UserError(f"train.batch_size = {self.batch_size} is not divisible by "
                            f"train.grad_accum = {self.grad_accum}")
        check_device_name(self.device, "train.device")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"train.precision = {self.precision!r}; expected auto, fp32, bf16 or fp16")
        if self.strategy not in ("ddp", "fsdp"):
            raise UserError(f"train.strategy = {self.strategy!r}; expected ddp or fsdp")
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise UserError("train.precision = 'fp16' does not work with train.strategy = 'fsdp' (its loss scaler "
                            "would see only this process's shard of the gradients); use bf16 or fp32")
        if not 0 < self.lr < math.inf or not 0 <= self.min_lr <= self.lr:
            raise UserError(f"train.lr = {self.lr}, train.min_lr = {self.min_lr}; expected 0 <= min_lr <= lr, lr > 0")
        if self.patience is not None and self.patience < 0:
            raise UserError(f"train.patience = {self.patience}; expected >= 0")
        if self.schedule not in ("cosine", "wsd"):
            raise UserError(f"train.schedule = {self.schedule!r}; expected cosine or wsd")
        if not 0 <= self.decay_fraction <= 1:
            raise UserError(f"train.decay_fraction = {self.decay_fraction}; expected a value in [0, 1]")
        if self.optimizer not in ("adamw", "muon"):
            raise UserError(f"train.optimizer = {self.optimizer!r}; expected adamw or muon")
        if self.optimizer == "muon" and self.strategy == "fsdp":
            raise UserError("train.optimizer = 'muon' does not work with train.strategy = 'fsdp' (Muon "
                            "orthogonalizes whole matrices; each process holds a shard); use adamw or ddp")
        if not 0 < self.muon_lr < math.inf:
            raise UserError(f"train.muon_lr = {self.muon_lr}; expected a positive number")
        if self.warmup_steps < 0:
            raise UserError(f"train.warmup_steps = {self.warmup_steps}; expected >= 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise UserError(f"train.max_minutes = {self.max_minutes}; expected a positive number")
        if self.dp_epsilon is not None and not 0 < self.dp_epsilon < math.inf:
            raise UserError(f"train.dp.epsilon = {self.dp_epsilon}; expected a positive number")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise UserError(f"train.dp.delta = {self.dp_delta}; expected a value between 0 and 1")
        if not 0 < self.dp_max_grad_norm < math.inf:
            raise UserError(f"train.dp.max_grad_norm = {self.dp_max_grad_norm}; expected a positive number")
        return self


# ----------------------------------------------------------------------------------------------
# each training verb's own defaults: the same fields as TrainConfig, other default values, shown
# by that verb's --help. A None here is filled in by the recipe from the data (see `resolve_train`).


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """Fine-tuning's defaults: a low, constant-then-decaying lr, no weight decay, one evaluation per epoch."""

    max_steps: int | None = param(None, "optimizer steps (default: --epochs passes over the training examples)")
    lr: float | None = param(None, "peak learning rate (default: 2e-4 with LoRA, 5e-5 for full fine-tuning)")
    min_lr: float = param(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int | None = param(0, "steps of linear warmup")
    weight_decay: float = param(0.0, "AdamW weight decay, applied to matrices only")
    eval_interval: int | None = param(None, "evaluate (and save) every this many steps (default: once per epoch)")
    eval_batches: int = param(1, "batches per evaluation")
    log_interval: int = param(1, "write metrics every this many steps")
    keep_best: bool = param(True, "also keep the checkpoint of the best validation loss in OUT/best")


@dataclass
class DPOTrainConfig(FinetuneTrainConfig):
    """DPO's defaults: fine-tuning's loop over preference pairs (a batch of 8 pairs is 16 sequences)."""

    lr: float | None = param(None, "peak learning rate (default: 5e-5 with LoRA, 1e-6 for full fine-tuning)")


@dataclass
class TaskFromScratchTrainConfig(FinetuneTrainConfig):
    """A task decoder trained from scratch (`summarize/translate train --preset`): fine-tuning's loop at a
    pretraining learning rate (fine-tuning's is far lower), batches of 16."""

    batch_size: int = param(16, "sequences per optimizer step, over all processes and accumulation steps")
    lr: float | None = param(1e-3, "peak learning rate")
    min_lr: float = param(1e-4, "learning rate at the end of the cosine decay")


@dataclass
class ClassifyTrainConfig(FinetuneTrainConfig):
    """Classifier training's defaults: a higher lr for the new head and the adapters, batches of 16, fp32."""

    batch_size: int = param(16, "sequences per optimizer step, over all processes and accumulation steps")
    lr: float | None = param(None, "peak learning rate (default: 5e-4 with LoRA, 5e-5 for full training)")
    warmup_steps: int | None = param(None, "steps of linear warmup (default: a tenth of the run, at most 50)")
    log_interval: int = param(10, "write metrics every this many steps")
    precision: str = param("fp32", "fp32 (the classifier's default: its reported accuracy was measured so), auto, "
                                   "bf16 or fp16")


@dataclass
class ScratchTrainConfig(TrainConfig):
    """Training a task model from scratch (seq2seq, cvae, a decoder of --preset): a pretraining lr,
    batches of 16, one evaluation per epoch, the best checkpoint kept."""

    max_steps: int | None = param(None, "optimizer steps (default: --epochs passes over the training pairs)")
    batch_size: int = param(16, "sequences per optimizer step, over all processes and accumulation steps")
    warmup_steps: int | None = param(None, "steps of linear warmup (default: a tenth of the run)")
    eval_interval: int | None = param(None, "evaluate (and save) every this many steps (default: once per epoch)")
    keep_best: bool = param(True, "also keep the checkpoint of the best validation loss in OUT/best")


@dataclass
class GANTrainConfig(TrainConfig):
    """Adversarial training's defaults (`lmforge gan train`): a short run at a fine-tuning lr (the generator
    starts pretrained), no warmup or weight decay, frequent evaluations, fp32, no `best/` (the held-out
    likelihood is not what adversarial training optimises: the last checkpoint is the result)."""

    batch_size: int = param(16, "sequences per step: real lines for the discriminator and the MLE term, and as "
                                "many samples of the generator")
    max_steps: int = param(300, "optimizer steps, discriminator and generator steps together")
    lr: float = param(1e-4, "peak learning rate (generator and discriminator)")
    min_lr: float = param(1e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = param(0, "steps of linear warmup")
    weight_decay: float = param(0.0, "AdamW weight decay, applied to matrices only")
    eval_interval: int = param(50, "evaluate (held-out bits per byte, samples, discriminator accuracy) and save "
                                   "every this many steps")
    eval_batches: int = param(20, "batches of held-out lines per evaluation (their bits per byte)")
    log_interval: int = param(10, "write metrics every this many steps")
    precision: str = param("fp32", "fp32 (the default: small models, exact rewards), auto, bf16 or fp16")
    keep_best: bool = param(False, "also keep the checkpoint of the best validation loss in OUT/best")


def resolve_train(config: TrainConfig, n_examples: int, epochs: float | None = None,
                  lr: float | None = None) -> tuple[TrainConfig, int]:
    """A plain, validated TrainConfig from a verb's config whose None fields follow the data: `max_steps`
    from `epochs` passes over `n_examples`, `eval_interval` one epoch, `lr` the recipe's default, and
    `warmup_steps` a tenth of the run (at most 50 for a classifier). Returns it and the steps per epoch."""
    if epochs is not None and epochs <= 0:
        raise UserError(f"--epochs = {epochs}; expected a positive number")
    values = to_dict(config)
    steps_per_epoch = max(1, n_examples // values["batch_size"])
    if values["max_steps"] is None:
        values["max_steps"] = max(1, math.ceil((epochs or 1) * steps_per_epoch))
    if values["eval_interval"] is None:
        values["eval_interval"] = steps_per_epoch
    if values["lr"] is None:
        values["lr"] = lr if lr is not None else TrainConfig.lr
    if values["warmup_steps"] is None:
        tenth = values["max_steps"] // 10
        values["warmup_steps"] = min(50, tenth) if isinstance(config, ClassifyTrainConfig) else max(1, tenth)
    return from_dict(TrainConfig, values, "train").validate(), steps_per_epoch


def merge_settings(cls: type, overrides: dict[str, Any] | None, section: str = "train", base: Any = None) -> Any:
    """`cls` (a config dataclass) from `base` (an instance, or the class defaults) and the `section.FIELD`
    entries of `overrides`; any other key is an error naming it."""
    values = to_dict(base) if base is not None else {}
    return from_dict(cls, {**values, **split_overrides(overrides, (section,))[section]}, section)


def split_overrides(overrides: dict[str, Any] | None, sections: tuple[str, ...] = ("model", "train")
                    ) -> dict[str, dict[str, Any]]:
    """`{"train.lr": 1e-3, "model.n_layer": 2}` -> `{"train": {"lr": 1e-3}, "model": {"n_layer": 2}}`; any
    other key is an error naming it."""
    parts: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for dotted, value in (overrides or {}).items():
        name, _, key = dotted.partition(".")
        if name not in parts or not key:
            raise UserError(f"unknown setting {dotted!r}; expected {' or '.join(f'{n}.FIELD' for n in sections)}")
        parts[name][key] = value
    return parts


def settings(**sections: type):
    """Declare the config dataclass of each settings section a verb's `overrides` take, e.g.
    `@settings(train=FinetuneTrainConfig)`: the CLI makes `--train.FIELD` flags of its fields (help text
    and default from the dataclass)."""

    def declare(function):
        function.settings = sections
        return function

    return declare


BETA_SCHEDULES = ("constant", "linear", "cyclical")


@dataclass
class ElboConfig:
    """The VAE objective: reconstruction cross-entropy + beta * KL, with beta annealing and free bits."""

    beta: float = param(1.0, "weight of the KL term once annealed (1 = the true ELBO)")
    beta_schedule: str = param("linear", "constant; linear (0 -> beta over beta_warmup_steps); or cyclical "
                                         "(Fu et al. 2019: beta_cycles cycles over the run, each rising 0 -> beta "
                                         "over its first beta_cycle_ratio, then held)")
    beta_warmup_steps: int | None = param(None, "linear: steps to reach beta (default: half of train.max_steps)")
    beta_cycles: int = param(4, "cyclical: number of cycles over train.max_steps")
    beta_cycle_ratio: float = param(0.5, "cyclical: share of each cycle spent rising, in (0, 1]")
    free_bits: float = param(0.0, "KL floor per latent dimension in nats (batch mean; 0 = off): dimensions "
                                  "under it get no push towards the prior")
    word_dropout: float = param(0.0, "share of the decoder's input tokens replaced by the start token in "
                                     "training (Bowman et al. 2016): the decoder must lean on z")
    iw_samples: int = param(16, "importance samples per text for the perplexity upper bound at evaluation")

    def validate(self) -> ElboConfig:
        if not 0 <= self.beta < math.inf:
            raise UserError(f"beta = {self.beta}; expected a finite number >= 0")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"beta_schedule = {self.beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")
        if self.beta_warmup_steps is not None and self.beta_warmup_steps < 0:
            raise UserError(f"beta_warmup_steps = {self.beta_warmup_steps}; expected >= 0")
        if self.beta_cycles < 1:
            raise UserError(f"beta_cycles = {self.beta_cycles}; expected a positive integer")
        if not 0 < self.beta_cycle_ratio <= 1:
            raise UserError(f"beta_cycle_ratio = {self.beta_cycle_ratio}; expected a value in (0, 1]")
        if not 0 <= self.free_bits < math.inf:
            raise UserError(f"free_bits = {self.free_bits}; expected a finite number >= 0 (nats per dimension)")
        if not 0 <= self.word_dropout < 1:
            raise UserError(f"word_dropout = {self.word_dropout}; expected a value in [0, 1)")
        if self.iw_samples < 1:
            raise UserError(f"iw_samples = {self.iw_samples}; expected a positive integer")
        return self

    def beta_at(self, step: int, max_steps: int) -> float:
        """The KL weight at optimizer step `step` of a run of `max_steps`."""
        if self.beta_schedule == "constant":
            return self.beta
        if self.beta_schedule == "linear":
            warmup = self.beta_warmup_steps if self.beta_warmup_steps is not None else max_steps // 2
            return self.beta if warmup == 0 else self.beta * min(1.0, step / warmup)
        period = max(1.0, max_steps / self.beta_cycles)
        phase = (step % period) / period  # position within the cycle, in [0, 1)
        return self.beta * min(1.0, phase / self.beta_cycle_ratio)


# ----------------------------------------------------------------------------------------------
# presets: named model shapes, from a toy that trains in seconds to a ~1B Llama shape

_GPT2 = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True)
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_GPT2, vocab_size=2048, block_size=128, n_layer=2, n_head=2, d_model=64),
    "gpt-micro": dict(_GPT2, vocab_size=8192, block_size=256, n_layer=4, n_head=4, d_model=256),
    "gpt-mini": dict(_GPT2, vocab_size=8192, block_size=256, n_layer=6, n_head=6, d_model=384),
    "gpt2": dict(_GPT2, vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(_GPT2, vocab_size=50257, block_size=1024, n_layer=24, n_head=16, d_model=1024),
    "llama-tiny": dict(_LLAMA, vocab_size=2048, block_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64),
    "llama-mini": dict(_LLAMA, vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_kv_head=2, d_model=384),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, block_size=2048, n_layer=30, n_head=9, n_kv_head=3,
                         d_model=576, d_ff=1536, rope_theta=100000.0),
    "llama-1b": dict(_LLAMA, vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8,
                     d_model=2048, d_ff=8192, rope_theta=500000.0),
}

PRESET_NOTES = {
    "tiny": "a toy for tests and smoke runs",
    "gpt-micro": "GPT-2 style, the demo's model (a few minutes on a laptop CPU)",
    "gpt-mini": "GPT-2 style, the benchmark shape",
    "gpt2": "the GPT-2 124M shape",
    "gpt2-medium": "the GPT-2 350M shape",
    "llama-tiny": "Llama style toy (RoPE, RMSNorm, SwiGLU, GQA)",
    "llama-mini": "Llama style, gpt-mini's size",
    "smollm2-135m": "the SmolLM2-135M shape",
    "llama-1b": "the Llama 3.2 1B shape",
}


def preset(name: str) -> ModelConfig:
    """The ModelConfig of a named preset (`lmforge models` lists them)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name]).validate()


# ----------------------------------------------------------------------------------------------
# dicts, YAML and flags in; dicts out


def union_members(tp: Any) -> list[Any]:
    return list(typing.get_args(tp)) if typing.get_origin(tp) in (Union, types.UnionType) else [tp]


def is_list_type(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple, Sequence, typing.Sequence)


def is_text_type(tp: Any) -> bool:
    """Whether a flag's text is the value itself (not read as YAML first)."""
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp in (str, Path, Any)


def is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def describe(tp: Any) -> str:
    """What a value of `tp` looks like, for error messages: "an int", "one of fp32, bf16", "a float or none"."""
    members = union_members(tp)
    if len(members) > 1:
        return " or ".join(dict.fromkeys(describe(m) for m in members))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if is_list_type(tp):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {describe(args[0]) if args else 'values'}"
    names = {NoneType: "none", bool: "true or false", int: "an int", float: "a float", str: "a string",
             Path: "a path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def convert(value: Any, tp: Any, where: str) -> Any:
    """`value` (YAML's, or a flag's text as `from_text` reads it) as a value of `tp`; a UserError naming
    `where` if it is not one."""
    if tp is Any:
        return value
    members = union_members(tp)
    if len(members) > 1:
        if value is None and NoneType in members:
            return None
        for member in members:  # the first that takes it
            if member is not NoneType:
                try:
                    return convert(value, member, where)
                except UserError:
                    pass
    elif typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp):
            return value
    elif is_list_type(tp):
        item = next((a for a in typing.get_args(tp) if a is not Ellipsis), Any)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [convert(v, item, f"{where}[{i}]") for i, v in enumerate(items)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp in (str, Path):
        if isinstance(value, (str, Path)):
            return tp(value)
    elif is_config_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp(**section_values(tp, value, where))
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UserError(f"{where} = {value!r}; expected {describe(tp)}")


def from_text(text: str, tp: Any, where: str, none_word: bool = False) -> Any:
    """A flag's text as a value of `tp`: text stays text where `tp` takes text; otherwise it reads as a
    YAML scalar (3e-4, true, none). `none`/`null` is None where `tp` allows None and is not text, or
    always with `none_word` (config fields: `--clean.normalize none`)."""
    members = union_members(tp)
    if NoneType in members and text.strip().lower() in ("none", "null") and (
            none_word or not any(is_text_type(m) for m in members)):
        return None
    if any(is_text_type(m) for m in members):
        return convert(text, tp, where)
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return convert(value, tp, where)


def section_values(cls: type, values: Any, where: str) -> dict[str, Any]:
    """The fields of dataclass `cls` given in the mapping `values`, each converted to its type."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of field: value, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"{where}.{key} is not a setting{did_you_mean(key, names)}")
        out[key] = convert(value, hints[key], f"{where}.{key}")
    return out


def did_you_mean(key: Any, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(names)}"


def from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `values`; unknown keys and wrong types are UserErrors naming `where`."""
    return cls(**section_values(cls, values, where))


def to_dict(config: Any) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    if isinstance(config, ModelConfig) and config.head_dim == config.d_model // config.n_head:
        values["head_dim"] = None  # the default, so that a copy with another d_model or n_head follows it
    return values


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of settings as a mapping; a one-line UserError where it is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} must be a mapping of setting: value")
    return doc


def load_run_config(
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: tuple[ModelConfig, TrainConfig] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Merge a preset, a YAML file (`preset:`, `model:`, `train:` sections) and `section.key` overrides,
    over the defaults or over `base` (the configs of a run being resumed: only what is given changes)."""
    sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    if base is not None:
        sections = {"model": {}, "train": to_dict(base[1])}
    if config_file is not None:
        path = Path(config_file)
        doc = read_yaml(path)
        for key in doc:
            if key not in ("preset", "model", "train"):
                raise UserError(f"{path}: unknown section {key!r}; expected preset, model, train")
        preset_name = preset_name or doc.get("preset")
        for section in ("model", "train"):
            part = doc.get(section) or {}
            if not isinstance(part, dict):
                raise UserError(f"{path}: {section} must be a mapping of field: value")
            sections[section].update(part)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in sections or not key:
            raise UserError(f"unknown setting {dotted!r}; expected model.FIELD or train.FIELD")
        sections[section][key] = value
    if preset_name and preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; known presets: {', '.join(PRESETS)}")
    model_values = to_dict(base[0]) if base is not None else {}
    model_values.update(PRESETS[preset_name] if preset_name else {})
    model = from_dict(ModelConfig, {**model_values, **sections["model"]}, "model").validate()
    train = from_dict(TrainConfig, sections["train"], "train").validate()
    return model, train


def save_yaml(path: str | Path, model: ModelConfig, train: TrainConfig) -> None:
    Path(path).write_text(yaml.safe_dump({"model": to_dict(model), "train": to_dict(train)}, sort_keys=False))
