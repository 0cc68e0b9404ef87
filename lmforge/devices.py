"""Which device a model runs on: one rule for every verb (`--device` on inference verbs, `train.device`
or `--device` on training verbs, `device=` in Python).

    resolve_device("auto")      # cuda:LOCAL_RANK under torchrun (cuda:0 alone) where CUDA works, else mps, else cpu
    resolve_device("cuda:1")    # that GPU; a clear UserError where it does not exist
    check_device_name("banana") # the spelling alone, without importing torch (config validation)

Under torchrun each process takes the GPU of its `LOCAL_RANK`: `auto` and `cuda` mean cuda:LOCAL_RANK
there, and a `cuda:N` naming another GPU is refused (every process would pile onto one). A device
that is absent (no CUDA build or driver, fewer GPUs, no Apple GPU) is a one-line UserError, raised
before anything is loaded or written.

torch is imported only when a device is resolved, so the command line's help stays fast.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from lmforge.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_HELP = ("where the model runs: auto (cuda:LOCAL_RANK under torchrun, else the first GPU, else mps, "
               "else cpu), cpu, cuda, cuda:N or mps")
_NAME = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def check_device_name(name: object, where: str = "--device") -> str:
    """`name` when it is spelled as a device lmforge takes (auto, cpu, cuda, cuda:N, mps), else a UserError."""
    match = _NAME.fullmatch(str(name).strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UserError(f"{where} = {name!r}; expected {DEVICE_CHOICES}")
    return match.group(0)


def local_rank() -> int | None:
    """This process's LOCAL_RANK under torchrun (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("LOCAL_RANK", "0"))
    return None


def resolve_device(name: str | torch.device = "auto", where: str = "--device") -> torch.device:
    """The torch.device `name` means on this machine (see the module docstring); a UserError where it
    is misspelled or absent."""
    import torch

    text = check_device_name(str(name) if not isinstance(name, str) else name, where)
    kind, _, index = text.partition(":")
    rank = local_rank()
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        if torch.cuda.is_available():
            return _cuda(rank or 0, where, text)
        if rank is None and _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise UserError(f"{where} = mps, but this machine has no Apple GPU that torch can use; "
                            f"use {where} auto or cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU or driver is visible"
        raise UserError(f"{where} = {text}, but {why} (torch {torch.__version__}); use {where} auto or cpu")
    if index and rank is not None and int(index) != rank:
        raise UserError(f"{where} = {text} under torchrun: each process uses the GPU of its LOCAL_RANK "
                        f"(this one: cuda:{rank}); use {where} cuda or auto")
    return _cuda(int(index) if index else (rank or 0), where, text)


def _cuda(index: int, where: str, text: str) -> torch.device:
    import torch

    count = torch.cuda.device_count()
    if index >= count:
        visible = ", ".join(f"cuda:{i}" for i in range(count))
        hint = f"start at most {count} processes per node" if local_rank() is not None else f"use one of {visible}"
        raise UserError(f"{where} = {text}, but this machine has {count} CUDA GPU{'s' * (count != 1)}; {hint}")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())

