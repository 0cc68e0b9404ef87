"""Knowledge distillation's objective: a student learns a frozen teacher's next-token distributions.

    teacher = Teacher(lmforge.load("runs/big"), dtype="auto")      # frozen, no_grad, fp32 or bf16 by measurement
    objective = DistillationObjective(teacher, alpha=0.5, temperature=2.0, loss="kl")
    trainer = Trainer(student, config, out, batches=..., loss_fn=objective)     # the one Trainer

The loss of a position is alpha * T^2 * D(teacher, student) on temperature-softened distributions
(T^2 keeps the gradients' scale as T changes, Hinton et al. 2015) plus (1 - alpha) * cross-entropy
on the data; positions whose target is -100 do not count. D is `kl` = KL(teacher || student),
`reverse-kl` = KL(student || teacher) (mode seeking), or `jsd` = the Jensen-Shannon divergence with
beta = 0.5.

`distillation_loss` is computed in chunks of positions, like the fused cross-entropy of
`lmforge.models.layers`: for each chunk both models' logits (chunk x vocab) are made, turned into
the loss and into d(loss)/d(student logits) (by autograd, on that chunk only), multiplied back into
the gradients of the student's hidden states and head weight, and dropped. The full (positions x
vocab) logits of either model never exist: peak memory is O(chunk x vocab).

A teacher cached as its top-k logits (`TeacherCache`, `lmforge distill --cache-teacher`) stands in
for the full teacher: its probabilities are renormalised over the k kept tokens (zero elsewhere),
against the student's full-vocabulary distribution. With k = vocab this is the full loss exactly;
KL(student || teacher) is infinite against a truncated teacher, so `reverse-kl` needs the full one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError

LOSSES = ("kl", "reverse-kl", "jsd")
TeacherChunk = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # logits (n, V), or top-k (values, indices) (n, k)
TeacherSource = Callable[[int, int], TeacherChunk]  # (start, end) -> the teacher's chunk of positions


def divergence(student_logits: torch.Tensor, teacher: TeacherChunk, loss: str, temperature: float) -> torch.Tensor:
    """D(teacher, student) per position (n,) on logits / temperature; the teacher full (n, V) or top-k."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    if isinstance(teacher, tuple):  # top-k: renormalised over the kept tokens, zero elsewhere
        values, indices = teacher
        p = torch.zeros_like(log_q).scatter_(1, indices, F.softmax(values.float() / temperature, dim=-1))
        log_p = None
    else:
        log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
        p = log_p.exp()
    if loss == "kl":
        return F.kl_div(log_q, p, reduction="none").sum(-1)  # sum p (log p - log q), 0 where p = 0
    if loss == "reverse-kl":
        if log_p is None:
            raise UserError("--loss reverse-kl needs the full teacher: KL(student || teacher) is infinite against "
                            "a top-k teacher; use kl or jsd with --cache-teacher")
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)  # sum q (log q - log p)
    if loss == "jsd":
        q = log_q.exp()
        log_m = (0.5 * (p + q)).clamp_min(torch.finfo(torch.float32).tiny).log()
        return 0.5 * (F.kl_div(log_m, p, reduction="none") + F.kl_div(log_m, q, reduction="none")).sum(-1)
    raise UserError(f"--loss = {loss!r}; expected one of {', '.join(LOSSES)}")


class _ChunkedDistillation(torch.autograd.Function):
    """The loss of `distillation_loss` with its gradients made chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, targets, teacher, alpha, temperature, loss, chunk_size, ignore_index):
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        grad_h = torch.zeros_like(h) if need_h else None  # (N, d)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, d)
        kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            end = min(start + chunk_size, h.shape[0])
            h_chunk, t_chunk = h[start:end], targets[start:end]
            valid = (t_chunk != ignore_index).float()
            with torch.enable_grad():
                logits = (h_chunk @ w.T).float().requires_grad_(need_h or need_w)  # (chunk, V): a leaf
                ce = F.cross_entropy(logits, t_chunk, ignore_index=ignore_index, reduction="none")
                part = (1 - alpha) * (ce * valid).sum()
                if alpha > 0:
                    kd = divergence(logits, teacher(start, end), loss, temperature)
                    part = part + alpha * temperature**2 * (kd * valid).sum()
                    kd_sum += (kd.detach() * valid).sum()
                ce_sum += (ce.detach() * valid).sum()
                if need_h or need_w:
                    (g,) = torch.autograd.grad(part / n_valid, logits)
            if need_h or need_w:
                g = g.to(h.dtype)  # d(loss)/d(logits) of the chunk
                if need_h:
                    torch.mm(g, w, out=grad_h[start:end])
                if need_w:
                    grad_w += (g.T @ h_chunk).float()
        ctx.need_h, ctx.need_w = need_h, need_w
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        kd_mean, ce_mean = kd_sum / n_valid, ce_sum / n_valid
        total = alpha * temperature**2 * kd_mean + (1 - alpha) * ce_mean
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return total, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_total, grad_kd, grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_total if ctx.need_h else None, grad_w * grad_total if ctx.need_w else None,
                None, None, None, None, None, None, None)


def distillation_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher: TeacherSource | None,
    alpha: float = 0.5, temperature: float = 1.0, loss: str = "kl", chunk_size: int = 256, ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha * T^2 * mean D + (1 - alpha) * mean cross-entropy, mean D, mean cross-entropy) of the student's
    logits h @ weight.T (h: (N, d), weight: (V, d), targets: (N,)), chunk by chunk; only the first carries a
    gradient. `teacher(start, end)` gives the teacher's logits of positions start:end, or their top-k
    (values, indices); it is not called when alpha is 0 (then D reads 0)."""
    if alpha > 0 and teacher is None:
        raise ValueError("distillation_loss: alpha > 0 needs a teacher")
    return _ChunkedDistillation.apply(h, weight, targets, teacher, float(alpha), float(temperature), loss,
                                      chunk_size, ignore_index)


# ----------------------------------------------------------------------------------------------
# the teacher


def is_quantized(model: nn.Module) -> bool:
    from lmforge.kernels.quantized import QuantizedLinear

    return any(isinstance(m, QuantizedLinear) for m in model.modules())


class Teacher:
    """A frozen teacher in eval mode, run under no_grad. `dtype`: fp32, bf16, or auto: the faster of the two,
    measured on the first batch it sees (forward time, second of two runs each); a quantized teacher is
    run as it was loaded."""

    def __init__(self, model: nn.Module, dtype: str = "auto"):
        self.model = model.eval().requires_grad_(False)
        self.dtype = "as loaded" if is_quantized(model) else dtype
        self.timings: dict[str, float] = {}
        if self.dtype == "bf16":
            self.model.to(torch.bfloat16)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states (B, T, d_teacher) for token ids (B, T)."""
        if self.dtype == "auto":
            self.choose_dtype(ids)
        return self.model.hidden_states(ids.to(self.device))

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (n, V) in fp32 of hidden states h (n, d_teacher): its own head (which may be quantized)."""
        return self.model.head(h).float()

    def source(self, h: torch.Tensor) -> TeacherSource:
        """`distillation_loss`'s teacher over hidden states h (N, d_teacher), a chunk of positions at a time."""
        return lambda start, end: self.logits(h[start:end])

    @torch.no_grad()
    def choose_dtype(self, ids: torch.Tensor) -> None:
        def timed(model: nn.Module) -> float:
            model.hidden_states(ids.to(self.device))
            start = time.perf_counter()
            model.hidden_states(ids.to(self.device))
            return time.perf_counter() - start

        self.timings["fp32"] = timed(self.model)
        bf16 = copy.deepcopy(self.model).to(torch.bfloat16)
        self.timings["bf16"] = timed(bf16)
        faster = self.timings["bf16"] < 0.9 * self.timings["fp32"]
        if faster:
            self.model = bf16
        self.dtype = "bf16" if faster else "fp32"
        print(f"teacher in {self.dtype}: a forward pass of the first batch took {self.timings['fp32']:.3f} s in fp32, "
              f"{self.timings['bf16']:.3f} s in bf16", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# the teacher's top-k logits on disk


class TeacherCache:
    """The teacher's top-k logits of every position of every training window, memory-mapped from `directory`
    (`values.npy` float32 and `indices.npy` int32, (windows, positions, k), and `cache.json` with the
    fingerprint of the teacher and the data they were made from)."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]):
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.values: np.ndarray | None = None
        self.indices: np.ndarray | None = None

    def exists(self) -> bool:
        return (self.directory / "cache.json").is_file()

    def open(self) -> TeacherCache:
        """Map the cache, after checking it was made from this teacher and data (a UserError otherwise)."""
        path = self.directory / "cache.json"
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a teacher cache ({e}); remove {self.directory} to make it again") from None
        for key, value in self.fingerprint.items():
            if stored.get(key) != value:
                raise UserError(f"the teacher cache {self.directory} was made with another {key} "
                                f"({stored.get(key)!r}, this run has {value!r}); remove it or choose another "
                                f"--cache-teacher")
        self.values = np.load(self.directory / "values.npy", mmap_mode="r")
        self.indices = np.load(self.directory / "indices.npy", mmap_mode="r")
        return self

    @torch.no_grad()
    def write(self, teacher: Teacher, windows: list[list[int]], k: int, batch_size: int,
              chunk_size: int = 256) -> TeacherCache:
        """Run the teacher over `windows` (token ids; each predicts its next tokens) and write its top-k."""
        from lmforge.files import atomic_directory

        length = max(len(w) for w in windows) - 1
        with atomic_directory(self.directory) as tmp:
            values = np.lib.format.open_memmap(tmp / "values.npy", "w+", np.float32, (len(windows), length, k))
            indices = np.lib.format.open_memmap(tmp / "indices.npy", "w+", np.int32, (len(windows), length, k))
            for first in range(0, len(windows), batch_size):
                rows = windows[first:first + batch_size]
                ids = torch.tensor([w[:-1] + [0] * (length + 1 - len(w)) for w in rows])
                h = teacher.hidden_states(ids).flatten(0, 1)
                flat_v = values[first:first + len(rows)].reshape(-1, k)  # views of the mapped files
                flat_i = indices[first:first + len(rows)].reshape(-1, k)
                for start in range(0, len(h), chunk_size):
                    top = teacher.logits(h[start:start + chunk_size]).topk(k, dim=-1)
                    flat_v[start:start + len(top.values)] = top.values.cpu().numpy()
                    flat_i[start:start + len(top.values)] = top.indices.cpu().numpy()
            values.flush()
            indices.flush()
            del values, indices
            (tmp / "cache.json").write_text(json.dumps({**self.fingerprint, "windows": len(windows),
                                                        "positions": length}, indent=2) + "\n")
        return self.open()

    def source(self, rows: torch.Tensor, length: int) -> TeacherSource:
        """`distillation_loss`'s teacher for the windows `rows` of a batch of `length` positions."""
        picks = rows.cpu().numpy()
        values = torch.from_numpy(np.ascontiguousarray(self.values[picks, :length])).flatten(0, 1)
        indices = torch.from_numpy(np.ascontiguousarray(self.indices[picks, :length])).flatten(0, 1).long()
        values, indices = values.to(rows.device), indices.to(rows.device)
        return lambda start, end: (values[start:end], indices[start:end])


def fingerprint(*parts: Any) -> str:
    """A short sha256 of `parts` (bytes, or anything whose repr is stable)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# the objective the Trainer calls


class DistillationObjective:
    """`loss_fn(student, batch)` for the Trainer: the student's final hidden states against the teacher's
    (or the cached top-k of the batch's `rows`), through `distillation_loss`. Keeps the running sums of
    the distillation and cross-entropy parts for the evaluation to report (`parts`)."""

    def __init__(self, teacher: Teacher | None, alpha: float, temperature: float, loss: str,
                 cache: TeacherCache | None = None, chunk_size: int = 256):
        self.teacher, self.cache, self.alpha, self.temperature = teacher, cache, alpha, temperature
        self.loss, self.chunk_size = loss, chunk_size
        self.sums = {"kd": 0.0, "ce": 0.0, "n": 0}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if hasattr(model, "module"):  # DistributedDataParallel would not see a call of hidden_states
            raise UserError("lmforge distill runs in one process (not under torchrun)")
        ids, targets = batch["ids"], batch["targets"]
        h = model.hidden_states(ids)
        teacher = None
        if self.alpha > 0 and self.cache is not None:
            teacher = self.cache.source(batch["rows"], ids.shape[1])
        elif self.alpha > 0:
            teacher = self.teacher.source(self.teacher.hidden_states(ids).flatten(0, 1))
        total, kd, ce = distillation_loss(h.flatten(0, 1), model.head_weight, targets.flatten(), teacher,
                                          self.alpha, self.temperature, self.loss, self.chunk_size)
        if model.training:
            self.sums["kd"] += kd.item()
            self.sums["ce"] += ce.item()
            self.sums["n"] += 1
        return total

    def parts(self) -> dict[str, float]:
        """The mean distillation and cross-entropy parts of the training loss since the last call."""
        sums, self.sums = self.sums, {"kd": 0.0, "ce": 0.0, "n": 0}
        if not sums["n"]:
            return {}
        return {"train_kd": sums["kd"] / sums["n"], "train_ce": sums["ce"] / sums["n"]}
