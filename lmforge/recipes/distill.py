"""The distillation recipe: a small student learns from a frozen teacher's next-token distributions.

    distill("runs/big", "llama-mini", "kjv", "runs/small", temperature=2.0, alpha=0.5)
    distill("runs/big", "runs/pruned", "corpus/", "runs/small2", loss="jsd")    # a checkpoint student
    distill("runs/big", "llama-mini", "kjv", "runs/s3", cache_teacher="runs/kjv-top64", top_k=64)

The teacher is anything `lmforge.load` takes that is a decoder (a quantized checkpoint keeps its
low-bit layers); it runs frozen, under no_grad, in fp32 or bf16, whichever measured faster on the
first batch (`teacher_dtype="auto"`). The student is a preset (built with the teacher's vocabulary,
and the teacher's tokenizer) or a checkpoint with the same vocabulary (a pruned or smaller model:
training continues from its weights). The data is plain text: a file, folder or glob, or a catalog
corpus (`kjv`, `shakespeare`: its train split, validated on its validation split), cut into windows
of the student's context. The objective is `lmforge.train.distillation` (chunked: the full logits
of neither model are ever held); the run is a Recipe over the one Trainer. Each evaluation reports
the student's held-out cross-entropy (val_loss), bits per byte (val_bpb) and KL(teacher || student)
at temperature 1 (val_kl), and the distillation and cross-entropy parts of the training loss since
the last one (train_kd, train_ce).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.config import (
    PRESETS,
    ModelConfig,
    TrainConfig,
    from_dict,
    param,
    preset,
    resolve_train,
    settings,
    split_overrides,
    to_dict,
)
from lmforge.data.batches import EpochBatches
from lmforge.data.sft import Example, collate
from lmforge.errors import UserError
from lmforge.train.distillation import (
    LOSSES,
    DistillationObjective,
    Teacher,
    TeacherCache,
    distillation_loss,
    fingerprint,
)
from lmforge.train.objectives import bits_per_byte, evaluate_tokens
from lmforge.train.recipe import Job, Recipe, run_recipe, say


@dataclass
class DistillTrainConfig(TrainConfig):
    """Distillation's defaults: one evaluation per epoch, the best checkpoint kept."""

    max_steps: int | None = param(None, "optimizer steps (default: --epochs passes over the training windows)")
    lr: float | None = param(None, "peak learning rate (default: 1e-3 for a preset student, 1e-4 for a checkpoint)")
    warmup_steps: int | None = param(None, "steps of linear warmup (default: a tenth of the run)")
    eval_interval: int | None = param(None, "evaluate (and save) every this many steps (default: once per epoch)")
    eval_batches: int = param(4, "batches of held-out windows per evaluation")
    keep_best: bool = param(True, "also keep the checkpoint of the best validation loss in OUT/best")


class Distill(Recipe):
    name = "distill"

    def __init__(self, teacher: str | Path, student: str | Path, data: str | Path, temperature: float = 2.0,
                 alpha: float = 0.5, loss: str = "kl", teacher_dtype: str = "auto", epochs: float | None = 1,
                 val_data: str | Path | None = None, val_fraction: float = 0.1, max_length: int | None = None,
                 cache_teacher: str | Path | None = None, top_k: int = 64, overrides: dict[str, Any] | None = None):
        super().__init__()
        if not temperature > 0:
            raise UserError(f"--temperature = {temperature}; expected a positive number")
        if not 0 <= alpha <= 1:
            raise UserError(f"--alpha = {alpha}; expected a value in [0, 1] (the weight of the distillation term)")
        if loss not in LOSSES:
            raise UserError(f"--loss = {loss!r}; expected one of {', '.join(LOSSES)}")
        if teacher_dtype not in ("auto", "fp32", "bf16"):
            raise UserError(f"--teacher-dtype = {teacher_dtype!r}; expected auto, fp32 or bf16")
        if cache_teacher is not None and top_k < 1:
            raise UserError(f"--top-k = {top_k}; expected a positive integer")
        if cache_teacher is not None and loss == "reverse-kl":
            raise UserError("--loss reverse-kl needs the full teacher (KL(student || teacher) is infinite against "
                            "a top-k cache); use kl or jsd with --cache-teacher, or drop --cache-teacher")
        self.teacher, self.student, self.data, self.val_data = teacher, student, data, val_data
        self.temperature, self.alpha, self.loss, self.teacher_dtype = temperature, alpha, loss, teacher_dtype
        self.epochs, self.val_fraction, self.max_length = epochs, val_fraction, max_length
        self.cache_teacher, self.top_k = cache_teacher, top_k
        parts = split_overrides(overrides)
        self.model_overrides = parts["model"]
        self.train_settings = from_dict(DistillTrainConfig, parts["train"], "train")
        self.is_preset = str(student) in PRESETS and not Path(student).exists()
        if self.model_overrides and not self.is_preset:
            raise UserError(f"model.* settings shape a preset student; {student} is a checkpoint")

    def settings(self) -> dict[str, Any]:
        return {"teacher": describe(self.teacher), "student": describe(self.student), "data": describe(self.data),
                "val_data": None if self.val_data is None else describe(self.val_data),
                "temperature": self.temperature, "alpha": self.alpha, "loss": self.loss,
                "max_length": self.max_length, "top_k": self.top_k if self.cache_teacher else None}

    def build(self) -> Job:
        from lmforge.models.decoder import Decoder
        from lmforge.sources import load

        check_teacher_fits(self.teacher, copies=1.5 if self.teacher_dtype == "auto" else 1.0)
        from lmforge.devices import resolve_device

        teacher_model = load(self.teacher, device=resolve_device(self.train_settings.device, "train.device"))
        check_decoder(teacher_model, self.teacher, "teacher")
        vocab, tokenizer = teacher_model.config.vocab_size, teacher_model.tokenizer
        if tokenizer is None:
            raise UserError(f"the teacher {self.teacher} has no tokenizer")
        if self.is_preset:
            values = {**to_dict(preset(str(self.student))), **self.model_overrides, "vocab_size": vocab}
            self.model_config = from_dict(ModelConfig, values, "model").validate()
            torch.manual_seed(self.train_settings.seed)
            student = Decoder(self.model_config)
        else:
            student = load(self.student, dequantize=True)  # a quantized student trains in float
            check_decoder(student, self.student, "student")
            if student.config.vocab_size != vocab:
                raise UserError(f"the student {self.student} has a vocabulary of {student.config.vocab_size} tokens, "
                                f"the teacher {self.teacher} {vocab}; the student must share the teacher's tokenizer")
        context = min(student.config.block_size, teacher_model.config.block_size)
        length = min(self.max_length or context, context)
        train_text, val_text = read_texts(self.data, self.val_data, self.val_fraction)
        tokens = [t for text in train_text for t in tokenizer.encode(text) + [tokenizer.eos_id]]
        windows = [tokens[i:i + length + 1] for i in range(0, len(tokens), length)]
        examples = [Example(f"window {i}", w, w) for i, w in enumerate(windows) if len(w) > 1]
        val_tokens = np.array([tokenizer.eos_id] + [t for text in val_text for t in tokenizer.encode(text)
                                                    + [tokenizer.eos_id]], dtype=np.int64)
        val_bytes = sum(len(text.encode("utf-8")) for text in val_text)
        if not examples or val_bytes == 0:
            raise UserError(f"{self.data}: no text to {'learn from' if not examples else 'validate on'}")
        self.train, steps_per_epoch = resolve_train(self.train_settings, len(examples), self.epochs,
                                                    1e-3 if self.is_preset else 1e-4)
        teacher = Teacher(teacher_model, self.teacher_dtype)
        cache = self.open_cache(teacher, examples, tokens, length) if self.cache_teacher and self.alpha > 0 else None
        objective = DistillationObjective(teacher, self.alpha, self.temperature, self.loss, cache)
        block, rows = length, self.train.batch_size
        max_windows = self.train.eval_batches * rows

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            loss = evaluate_tokens(m, val_tokens, block, rows, max_windows)["loss"]
            return {"val_loss": loss, "val_bpb": bits_per_byte(loss, len(val_tokens) - 1, val_bytes),
                    "val_kl": held_out_kl(m, teacher, val_tokens, block, rows, max_windows), **objective.parts()}

        self.evaluate_teacher = lambda: evaluate_tokens(teacher.model, val_tokens, block, rows, max_windows)["loss"]
        pad = tokenizer.eos_id
        batches = EpochBatches(list(enumerate(examples)), rows, self.train.seed,
                               lambda items, step, part: {**collate([e for _, e in items], pad),
                                                          "rows": torch.tensor([i for i, _ in items])})
        say(f"distilling {self.teacher} ({teacher_model.num_parameters():,} parameters) into {self.student} "
            f"({student.num_parameters():,}): {len(examples)} windows of {length} tokens, "
            f"{len(val_tokens) - 1:,} held-out tokens; {steps_per_epoch} steps per epoch")
        return Job(student, batches, loss_fn=objective, evaluate=evaluate, tokenizer=tokenizer,
                   info={"teacher": describe(self.teacher), "student": describe(self.student),
                         "data": describe(self.data), "temperature": self.temperature, "alpha": self.alpha,
                         "loss": self.loss, "parameters": student.num_parameters()},
                   tokens_per_row=length, steps_per_epoch=steps_per_epoch)

    def open_cache(self, teacher: Teacher, examples: list[Example], tokens: list[int], length: int) -> TeacherCache:
        """The teacher's top-k over the training windows: read from --cache-teacher, or made there once."""
        prints = {"teacher": teacher_fingerprint(self.teacher), "data": fingerprint(np.asarray(tokens).tobytes()),
                  "window": length, "top_k": self.top_k}
        cache = TeacherCache(self.cache_teacher, prints)
        if cache.exists():
            say(f"reading the teacher's top-{self.top_k} logits from {self.cache_teacher}")
            return cache.open()
        say(f"writing the teacher's top-{self.top_k} logits to {self.cache_teacher}")
        return cache.write(teacher, [e.ids for e in examples], self.top_k, self.train.batch_size)

    def before(self, trainer) -> dict[str, Any]:
        metrics = trainer.evaluate(trainer.model)
        teacher_loss = self.evaluate_teacher()
        say(f"before: student val loss {metrics['val_loss']:.4f}, KL to the teacher {metrics['val_kl']:.4f}; "
            f"teacher val loss {teacher_loss:.4f}")
        return {"val_loss_before": round(metrics["val_loss"], 6), "val_kl_before": round(metrics["val_kl"], 6),
                "teacher_val_loss": round(teacher_loss, 6)}

    def title(self, job: Job, out: Path) -> str:
        return f"{Path(str(self.student)).name} distilled from {Path(str(self.teacher)).name} ({self.loss})"


@torch.no_grad()
def held_out_kl(student: torch.nn.Module, teacher: Teacher, tokens: np.ndarray, block: int, batch_size: int,
                max_windows: int) -> float:
    """Mean KL(teacher || student) per position at temperature 1 over the windows `evaluate_tokens` scores."""
    n_windows = max(1, (len(tokens) - 1) // block)
    picks = np.linspace(0, n_windows - 1, max_windows).round().astype(int) if n_windows > max_windows \
        else np.arange(n_windows)
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(picks), batch_size):
        starts = picks[i:i + batch_size] * block
        size = min(block, len(tokens) - 1 - int(starts.max()))
        ids = torch.from_numpy(np.stack([tokens[s:s + size] for s in starts])).to(device)
        h = student.hidden_states(ids).flatten(0, 1)
        source = teacher.source(teacher.hidden_states(ids).flatten(0, 1))
        _, kl, _ = distillation_loss(h, student.head_weight, torch.zeros(len(h), dtype=torch.long, device=device),
                                     source, alpha=1.0, temperature=1.0, loss="kl")
        total, count = total + kl.item() * len(h), count + len(h)
    return total / count


def read_texts(data: str | Path, val_data: str | Path | None, val_fraction: float) -> tuple[list[str], list[str]]:
    """The training and held-out texts: a catalog corpus's train and validation splits, or files with their
    --val-data, or else the last --val-fraction of the documents (of the text, for a single document)."""
    from lmforge.data.datasets import DATASETS, load
    from lmforge.data.readers import read_documents

    def texts(source: str | Path, split: str) -> list[str]:
        if str(source) in DATASETS and not Path(source).exists():
            return ["\n".join(str(r.get("text", "")) for r in load(str(source), split))]
        return [d.text for d in read_documents(source)]

    train = texts(data, "train")
    if val_data is not None:
        return train, texts(val_data, "validation")
    if str(data) in DATASETS and not Path(data).exists():
        return train, texts(data, "validation")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction = {val_fraction}; expected a value between 0 and 1")
    if len(train) >= 2:
        n_val = max(1, round(val_fraction * len(train)))
        return train[:-n_val], train[-n_val:]
    text = train[0] if train else ""
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)) + 1) + 1 or int(len(text) * (1 - val_fraction))
    return [text[:cut]], [text[cut:]]


def check_decoder(model: torch.nn.Module, source: str | Path, role: str) -> None:
    kind = getattr(getattr(model, "config", None), "kind", None)
    if kind != "decoder" or not hasattr(model, "hidden_states"):
        raise UserError(f"the {role} {source} is a {kind or type(model).__name__} model; distillation takes a "
                        f"decoder (causal LM)")


def check_teacher_fits(source: str | Path, copies: float = 1.0) -> None:
    """Refuse a teacher whose weights (from its config.json and weight files) exceed the available memory."""
    from lmforge.interop import resolve_source
    from lmforge.kernels.cpu import available_memory
    from lmforge.recipes.sizing import non_embedding_parameters
    from lmforge.train.checkpoint import read_config_file, resolve_checkpoint

    resolved = resolve_source(source)
    directory = resolve_checkpoint(resolved.path) if resolved.kind == "lmforge" else resolved.path
    files = sum(f.stat().st_size for f in Path(directory).glob("*") if f.suffix in (".safetensors", ".bin", ".gguf"))
    need, how = files, "its weight files"
    if resolved.kind == "lmforge":
        config, records = read_config_file(directory)
        if config.kind != "decoder":
            raise UserError(f"the teacher {source} is a {config.kind} model; distillation takes a decoder (causal LM)")
        parameters = non_embedding_parameters(config) + config.vocab_size * config.d_model * (
            1 if config.tie_embeddings else 2)
        if "quantization" not in records and 4 * parameters > need:
            need, how = 4 * parameters, f"{parameters:,} parameters in fp32, by its config.json"
    need = int(need * copies)
    available = available_memory()
    if need > available:
        raise UserError(f"the teacher {source} needs about {need / 2**30:,.1f} GiB of memory ({how}"
                        f"{', and a bf16 copy to time' if copies > 1 else ''}) but {available / 2**30:,.1f} GiB is "
                        f"available; choose a smaller teacher, a quantized one (lmforge quantize), or --teacher-dtype")


def teacher_fingerprint(source: str | Path) -> str:
    """The teacher's identity for the cache: its checkpoint's file records, else its files' names and sizes."""
    from lmforge.interop import resolve_source
    from lmforge.train.checkpoint import resolve_checkpoint, verify_checkpoint

    resolved = resolve_source(source)
    if resolved.kind == "lmforge":
        return fingerprint(verify_checkpoint(resolve_checkpoint(resolved.path)).get("files"))
    return fingerprint(sorted((f.name, f.stat().st_size) for f in Path(resolved.path).glob("*") if f.is_file()))


def describe(source: Any) -> str:
    return str(Path(source).resolve()) if Path(str(source)).exists() else str(source)


@settings(model=ModelConfig, train=DistillTrainConfig)
def distill(
    teacher: str | Path,
    student: str | Path,
    data: str | Path,
    out: str | Path,
    temperature: float = 2.0,
    alpha: float = 0.5,
    loss: Literal["kl", "reverse-kl", "jsd"] = "kl",
    teacher_dtype: Literal["auto", "fp32", "bf16"] = "auto",
    epochs: float | None = 1,
    val_data: str | Path | None = None,
    val_fraction: float = 0.1,
    max_length: int | None = None,
    cache_teacher: str | Path | None = None,
    top_k: int = 64,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Distill a teacher model into a smaller student (knowledge distillation).

    The loss is alpha * T^2 * KL(teacher || student) on the temperature-softened next-token distributions
    plus (1 - alpha) * cross-entropy on the data (--loss reverse-kl: KL(student || teacher); jsd: the
    Jensen-Shannon divergence), computed in chunks of positions so that neither model's full logits are held.
    The student is a preset (built with the teacher's vocabulary and tokenizer; --model.FIELD reshapes it) or
    a checkpoint with the same vocabulary (e.g. a pruned teacher), trained on from its weights. Prints the
    student's validation loss, bits per byte and KL to the teacher every epoch and keeps the best checkpoint
    in OUT/best. Returns the summary.

    Args:
        teacher: the teacher: a decoder checkpoint, Hugging Face directory, .gguf file or catalog model
        student: a preset (lmforge models) or a checkpoint with the teacher's vocabulary
        data: the training text (.txt/.md/.jsonl; a file, folder or glob) or a catalog corpus (kjv, shakespeare)
        out: the run directory to create
        temperature: the softmax temperature T of both models' distributions (> 0)
        alpha: the weight of the distillation term, in [0, 1] (0: cross-entropy only)
        loss: the divergence: kl (teacher || student), reverse-kl (student || teacher) or jsd
        teacher_dtype: the teacher's precision; auto: the faster of fp32 and bf16, measured on the first batch
        epochs: passes over the training windows (sets train.max_steps unless that is given)
        val_data: held-out text (default: a catalog corpus's validation split, or --val-fraction of DATA)
        val_fraction: the share of DATA held out when there is no --val-data (whole documents where there are several)
        max_length: tokens per training window (default: the student's context)
        cache_teacher: a directory for the teacher's top-k logits over DATA: made once, reused by later runs
        top_k: logits kept per position in --cache-teacher (the teacher is renormalised over them)
        overrides: model.FIELD (a preset student's shape) and train.FIELD settings
        resume: continue the run in --out after a stop or a kill (the same command; train.* may change)
    """
    recipe = Distill(teacher, student, data, temperature, alpha, loss, teacher_dtype, epochs, val_data, val_fraction,
                     max_length, cache_teacher, top_k, overrides)
    return run_recipe(recipe, out, resume)


def distilled(summary: dict[str, Any], arguments: dict[str, Any]) -> str:
    """What `lmforge distill` prints when it is done."""
    before = f"{summary['val_loss_before']:.4f} before, " if "val_loss_before" in summary else ""
    return (f"student validation loss {before}{summary.get('best_val_loss', float('nan')):.4f} at best "
            f"(teacher {summary.get('teacher_val_loss', float('nan')):.4f}); KL to the teacher "
            f"{summary.get('val_kl', float('nan')):.4f}; the best checkpoint is in {arguments['out']}/best")

