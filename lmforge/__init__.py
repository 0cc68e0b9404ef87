"""lmforge: the whole life of a generative language model, readable and fast.

    import lmforge
    lmforge.prepare("corpus/", "runs/data")
    lmforge.pretrain("runs/data", "runs/x", preset="gpt-micro")
    model = lmforge.load("runs/x")            # model(ids) -> logits; model.tokenizer
    model = lmforge.load("runs/x-enc", key="data.key")   # an encrypted checkpoint, decrypted in memory (lmforge.crypto)
    chat = lmforge.load("smollm2-135m-instruct")   # or a Hugging Face directory, a .gguf file
    print(model.generate("Once upon a time", max_new_tokens=50)[0])
    lmforge.evaluate("runs/sum", "summarize", data="xsum", out="runs/sum-eval")   # the numbers of `lmforge eval`
    from lmforge.data import load; records = load("rotten_tomatoes", "test")   # the dataset catalog
"""

import importlib
from typing import Any

from lmforge.errors import UserError

__version__ = "0.1.0"
__all__ = [
    "UserError",
    "chat",
    "consolidate",
    "demo",
    "distill",
    "dpo",
    "evaluate",
    "export",
    "finetune",
    "generate",
    "import_model",
    "load",
    "make_pairs",
    "merge",
    "model_table",
    "prepare",
    "pretrain",
    "prune",
    "quantize",
    "serve",
    "train_gan",
    "train_tokenizer",
]


_HOMES = {"demo": "lmforge.demo", "finetune": "lmforge.recipes.finetune", "chat": "lmforge.tasks.chat",
          "evaluate": "lmforge.tasks.evaluate", "distill": "lmforge.recipes.distill",
          "quantize": "lmforge.infer.quantize", "prune": "lmforge.infer.prune",
          "serve": "lmforge.server.app", "dpo": "lmforge.recipes.dpo", "make_pairs": "lmforge.tasks.preference",
          "train_gan": "lmforge.recipes.gan"}


def __getattr__(name: str) -> Any:
    # the verbs import torch; load them on first use so `lmforge --help` answers at once
    if name in __all__:
        return getattr(importlib.import_module(_HOMES.get(name, "lmforge.api")), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
