"""The DPO recipe: tune a chat model toward the answers people prefer (Direct Preference Optimization).

    summary = dpo("smollm2-135m-instruct", "runs/pairs", "runs/dpo", method="lora", beta=0.1)
    lmforge dpo smollm2-135m-instruct --data runs/pairs --out runs/dpo --method lora --beta 0.1 [--loss ipo]

The data is preference pairs (`lmforge.data.preference`: prompt, chosen, rejected; text or chat
messages), or the folder `lmforge dpo-pairs` writes (its train.jsonl, validated on its heldout.jsonl).
The reference model is the model before training, or `--reference CKPT` (same tokenizer); its
log-probabilities of every pair are computed once, before training, by the model as the Trainer runs it
(device, precision, kernels), and the policy trains against them, so only one model is in memory and the
policy starts equal to the reference to the last bit (with LoRA the adapters start at zero). The
objective is `lmforge.train.preference` (sigmoid = DPO, ipo = IPO), on the answer tokens only. Logged at
each evaluation (metrics.jsonl, progress): the held-out loss, reward accuracy, chosen and rejected
rewards and their margin, the held-out chosen answers' loss per token (`chosen_nll`), and the same
reward figures over the training batches since the last evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import DPOTrainConfig, merge_settings, resolve_train, settings
from lmforge.data.batches import EpochBatches, hold_out
from lmforge.data.preference import collate_preferences, load_pairs
from lmforge.errors import UserError
from lmforge.recipes.finetune import apply_lora, describe_source, model_to_train
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.preference import PreferenceLoss, check_settings, evaluate_preferences, reference_logprobs
from lmforge.train.recipe import Job, Recipe, run_recipe, say

DEFAULT_LR = {"lora": 5e-5, "full": 1e-6}
PAIRS_FILES = ("train.jsonl", "heldout.jsonl")  # what `lmforge dpo-pairs` writes


class DPO(Recipe):
    name = "dpo"

    def __init__(self, model: Any, data: Any, method: str = "lora", beta: float = 0.1, loss: str = "sigmoid",
                 reference: str | Path | None = None, epochs: float | None = 1, val_data: Any = None,
                 val_fraction: float = 0.1, max_length: int | None = 512, lora: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None):
        super().__init__()
        if method not in ("full", "lora"):
            raise UserError(f"--method = {method!r}; expected full or lora")
        check_settings(beta, loss)
        self.model, self.data, self.method, self.beta, self.loss = model, data, method, beta, loss
        self.reference, self.epochs, self.val_data, self.val_fraction = reference, epochs, val_data, val_fraction
        self.max_length = max_length
        self.lora = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": None, **(lora or {})}
        self.train_settings = merge_settings(DPOTrainConfig, overrides)
        self.name_of_model = describe_source(model)

    def settings(self) -> dict[str, Any]:
        return {"model": self.name_of_model, "data": describe_source(self.data), "method": self.method,
                "beta": self.beta, "loss": self.loss,
                "reference": None if self.reference is None else describe_source(self.reference),
                "val_data": None if self.val_data is None else describe_source(self.val_data),
                "val_fraction": self.val_fraction, "max_length": self.max_length,
                "lora": self.lora if self.method == "lora" else None}

    def build(self) -> Job:
        data, val_data = self.data, self.val_data
        if isinstance(data, (str, Path)) and all((Path(data) / name).is_file() for name in PAIRS_FILES):
            data, val_data = Path(data) / PAIRS_FILES[0], val_data if val_data is not None else \
                Path(data) / PAIRS_FILES[1]
        model, loss_fn, context = model_to_train(self.model, self.name_of_model)
        native, tokenizer = loss_fn is causal_lm_loss, model.tokenizer
        max_length = min(self.max_length or context, context)
        pairs = load_pairs(data, tokenizer, max_length)
        if val_data is not None:
            train, val = pairs, load_pairs(val_data, tokenizer, max_length)
        else:
            train, val = hold_out(pairs, self.val_fraction, seed=0, what="pair")
        self.train, steps_per_epoch = resolve_train(self.train_settings, len(train), self.epochs,
                                                    DEFAULT_LR[self.method])
        batch_size, pad_id = self.train.batch_size, tokenizer.eos_id
        self.pairs, self.pad_id, self.native = {"train": train, "val": val}, pad_id, native
        self.reference_model = self._reference_model(tokenizer) if self.reference is not None else None
        if self.method == "lora":
            torch.manual_seed(self.train.seed)
            model = apply_lora(model, self.lora["rank"], self.lora["alpha"], self.lora["dropout"],
                               self.lora["targets"])
        objective = PreferenceLoss(self.beta, self.loss, native)

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            return {**evaluate_preferences(m, self.pairs["val"], batch_size, pad_id, self.beta, self.loss, native),
                    **objective.take_stats()}

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"DPO ({self.loss}, beta {self.beta}) of {self.name_of_model} ({self.method}: {trainable:,} of "
            f"{sum(p.numel() for p in model.parameters()):,} parameters train) on {len(train)} pairs, "
            f"{len(val)} held out; {steps_per_epoch} steps per epoch")
        rows = EpochBatches(range(len(train)), batch_size, self.train.seed, lambda items, step, part:
                            collate_preferences([self.pairs["train"][i] for i in items], pad_id))
        tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in train) / len(train)
        return Job(model, rows, loss_fn=objective, evaluate=evaluate, tokenizer=tokenizer,
                   info={"base": self.name_of_model, "method": self.method, "data": describe_source(self.data),
                         "dpo": {"beta": self.beta, "loss": self.loss}, "lora": self.settings()["lora"]},
                   tokens_per_row=tokens, steps_per_epoch=steps_per_epoch)

    def ready(self, trainer) -> None:
        """The reference's log-probabilities of every pair, once, with the model as it trains (device, precision,
        kernels) before any step (a resumed run's checkpoint is loaded after this): the policy starts equal to
        the reference, to the last bit. `--reference CKPT` (loaded and checked by `build`) is cast to the
        same device and precision, used and dropped."""
        model = trainer.model
        if self.reference_model is not None:
            model = self.reference_model.to(device=trainer.dist.device, dtype=trainer.dtype)
        say(f"reference log-probabilities of {len(self.pairs['train'])} training and {len(self.pairs['val'])} "
            f"held-out pairs ({'the model before training' if self.reference is None else self.reference})")
        for part, pairs in self.pairs.items():
            self.pairs[part] = reference_logprobs(model, pairs, trainer.config.batch_size, self.pad_id, self.native)
        self.reference_model = None

    def _reference_model(self, tokenizer) -> torch.nn.Module:
        from lmforge.sources import load

        reference = load(self.reference, dequantize=True)
        other = getattr(reference, "tokenizer", None)
        if other is None or other.backend.to_str() != tokenizer.backend.to_str():
            raise UserError(f"--reference {self.reference} has another tokenizer than {self.name_of_model}; "
                            f"the reference must score the same token ids")
        return reference

    def before(self, trainer) -> dict[str, Any]:
        metrics = trainer.evaluate(trainer.model.eval())
        say(f"before: held-out DPO loss {metrics['val_loss']:.4f}, chosen answers' loss {metrics['chosen_nll']:.4f}")
        return {"val_loss_before": round(metrics["val_loss"], 6), "chosen_nll_before": round(metrics["chosen_nll"], 6)}

    def title(self, job: Job, out: Path) -> str:
        return f"{Path(self.name_of_model).name} DPO ({self.loss}, {self.method})"


@settings(train=DPOTrainConfig)
def dpo(
    model: str | Path | torch.nn.Module,
    data: str | Path | Sequence[dict],
    out: str | Path,
    method: Literal["full", "lora"] = "lora",
    beta: float = 0.1,
    loss: Literal["sigmoid", "ipo"] = "sigmoid",
    reference: str | Path | None = None,
    epochs: float | None = 1,
    val_data: str | Path | Sequence[dict] | None = None,
    val_fraction: float = 0.1,
    max_length: int | None = 512,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_targets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Tune a model toward preferred answers with DPO (or IPO) on pairs of (prompt, chosen, rejected).

    DATA is JSONL with prompt/chosen/rejected (strings, or chat messages: the chat template is applied) or
    the folder `lmforge dpo-pairs` writes. The reference is the model before training (or --reference);
    its log-probabilities are computed once. Keeps the best checkpoint (held-out DPO loss) in OUT/best.

    Args:
        model: the model to tune (a checkpoint, a Hugging Face directory, smollm2-135m-instruct, ...)
        data: the preference pairs (a .jsonl file, folder or glob; or a dpo-pairs folder)
        out: the run directory to create
        method: train all weights (full), or LoRA adapters
        beta: how far the policy may move from the reference (larger: closer); DPO's beta, IPO's tau
        loss: sigmoid (DPO) or ipo
        reference: the reference model (default: the model before training); it must have the same tokenizer
        epochs: passes over the pairs (sets train.max_steps unless that is given)
        val_data: held-out pairs (default: a dpo-pairs folder's heldout.jsonl, or --val-fraction of DATA)
        val_fraction: the share of DATA held out when there is no --val-data
        max_length: cut prompt + answer to this many tokens (the prompt's start first)
        lora_rank: the rank of the LoRA adapters
        lora_alpha: LoRA's scale numerator (the update is scaled by alpha / rank)
        lora_dropout: dropout on the adapters' input
        lora_targets: names of the linear layers to adapt (default: all of attention and MLP)
        overrides: train.FIELD settings
        resume: continue the run in --out after a stop or a kill
    """
    lora = {"rank": lora_rank, "alpha": float(lora_alpha), "dropout": lora_dropout,
            "targets": list(lora_targets) if lora_targets else None}
    recipe = DPO(model, data, method, beta, loss, reference, epochs, val_data, val_fraction, max_length, lora,
                 overrides)
    return run_recipe(recipe, out, resume)


def tuned(summary: dict[str, Any], arguments: dict[str, Any]) -> str:
    """What `lmforge dpo` prints when it is done."""
    return (f"held-out reward accuracy {summary.get('reward_accuracy', float('nan')):.3f}, margin "
            f"{summary.get('margin', float('nan')):.3f}; DPO loss {summary.get('val_loss_before', float('nan')):.4f} "
            f"before, {summary.get('best_val_loss', float('nan')):.4f} at best; the best checkpoint is in "
            f"{arguments['out']}/best")
