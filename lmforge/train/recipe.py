"""Recipes: what a training verb builds, handed to the one Trainer, run the same way for every verb.

A recipe is a small class (`lmforge.recipes`): its settings, and `build()` that returns a `Job`: the
model, the batches, the objective and the evaluation. Optional hooks: `ready()` prepares what needs the
Trainer's model as it will train, `before()` measures the model before training (e.g. its validation
loss), `report()` adds to the final summary (plots, extra metrics). `run_recipe` does the rest,
identically for every verb:

    summary = run_recipe(Finetune(model="smollm2-135m-instruct", data="chatterbot", method="lora"),
                         out="runs/chat", resume=False)

1. a new run refuses an `out` that holds anything; a resumed one needs its `run.yaml` and refuses
   only a setting that differs from the one the run was started with (naming it);
2. the recipe builds its job; the Trainer is made from the job and the recipe's `TrainConfig`;
3. `run.yaml` records the recipe's name, its settings and its model and train configs;
4. the Trainer fits (or resumes exactly), draws `loss.png` and writes `summary.json`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from lmforge.config import ModelConfig, TrainConfig, to_dict
from lmforge.devices import resolve_device
from lmforge.errors import UserError
from lmforge.files import check_new_directory
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import Trainer

RUN_FILE = "run.yaml"


@dataclass
class Job:
    """What a recipe hands to the Trainer (see `Trainer` for each part)."""

    model: nn.Module
    batches: Callable[[int, int, int], dict[str, Any]]
    loss_fn: Callable[[nn.Module, dict[str, Any]], Any] = causal_lm_loss
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    tokenizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    tokens_per_row: float | None = None
    flops_per_token: float | None = None
    steps_per_epoch: int | None = None


class Recipe:
    """A training verb. Subclasses set `name`, fill `self.train` (a resolved TrainConfig) and, for a
    model made from a config, `self.model_config` in `build()`; `settings()` returns the choices that
    define the run besides train.* (data, method, adapters ...): a resumed run must repeat them."""

    name = "train"

    def __init__(self) -> None:
        self.train: TrainConfig | None = None
        self.train_settings: TrainConfig | None = None  # the train settings known before build(), if any
        self.model_config: ModelConfig | None = None
        self.resumed: dict[str, Any] | None = None  # the run.yaml of the run being resumed, set before build()

    def settings(self) -> dict[str, Any]:
        return {}

    def build(self) -> Job:
        raise NotImplementedError

    def ready(self, trainer: Trainer) -> None:
        """Work that needs the Trainer's model as it will train (its device, precision and kernels), for a new
        run and a resumed one alike, before a checkpoint is loaded (e.g. DPO's reference log-probabilities)."""

    def before(self, trainer: Trainer) -> dict[str, Any]:
        """Metrics of the model before training (a new run only); printed and kept in the summary."""
        return {}

    def report(self, trainer: Trainer, summary: dict[str, Any]) -> dict[str, Any]:
        """The final summary; the place for plots and metrics of the trained model."""
        return summary

    def title(self, job: Job, out: Path) -> str:
        """The title of `loss.png`."""
        return f"{out.name}: {self.name}"


def run_recipe(recipe: Recipe, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Build `recipe`, train it into the run directory `out` (or resume it), return the summary."""
    out = Path(out)
    stored = recipe.resumed = read_run(out) if resume else None
    if not resume:
        if (out / RUN_FILE).is_file():
            raise UserError(f"{out} already exists and holds a run; pass --resume to continue it, "
                            f"or choose another --out")
        check_new_directory(out)
    known = recipe.train or recipe.train_settings
    if known is not None:  # a device that is not there fails before the model and the data are read
        resolve_device(known.device, "train.device")
    job = recipe.build()
    if stored is not None:
        check_same_run(stored, recipe, out)
    trainer = Trainer(job.model, recipe.train, out, batches=job.batches, evaluate=job.evaluate, loss_fn=job.loss_fn,
                      tokenizer=job.tokenizer, info={"recipe": recipe.name, **job.info},
                      tokens_per_row=job.tokens_per_row, flops_per_token=job.flops_per_token,
                      steps_per_epoch=job.steps_per_epoch)
    before = {}
    if trainer.dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_run(out, recipe)
    recipe.ready(trainer)
    if not resume:
        before = recipe.before(trainer)
    summary = trainer.fit(resume=resume)
    summary = recipe.report(trainer, {**summary, **before, "out": str(out)})
    return trainer.finish(summary, title=recipe.title(job, out))


def write_run(out: Path, recipe: Recipe) -> None:
    """`run.yaml`: the recipe, its settings and configs (what `--resume` compares against)."""
    doc: dict[str, Any] = {"recipe": recipe.name, "settings": recipe.settings()}
    if recipe.model_config is not None:
        doc["model"] = to_dict(recipe.model_config)
    doc["train"] = to_dict(recipe.train)
    partial = out / f".{RUN_FILE}.partial"
    partial.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    partial.replace(out / RUN_FILE)


def read_run(out: Path) -> dict[str, Any]:
    """The `run.yaml` of a run to resume; a clear error where there is none."""
    path = out / RUN_FILE
    if not path.is_file():
        raise UserError(f"cannot resume: {out} holds no run ({path} is missing); drop --resume to start one")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a run file (expected a mapping with model: and train:)")
    return doc


def check_same_run(stored: dict[str, Any], recipe: Recipe, out: Path) -> None:
    """Refuse to resume with a setting (other than train.*) that differs from the run's, naming it."""
    where = out / RUN_FILE
    if stored.get("recipe", recipe.name) != recipe.name:
        raise UserError(f"{out} is a {stored['recipe']} run, not a {recipe.name} run; resume it with "
                        f"lmforge {stored['recipe']}")
    differences = []
    for key, value in recipe.settings().items():
        if key in stored.get("settings", {}) and stored["settings"][key] != value:
            differences.append(f"{key} = {value!r} (the run has {stored['settings'][key]!r})")
    if recipe.model_config is not None and isinstance(stored.get("model"), dict):
        for key, value in to_dict(recipe.model_config).items():
            if key in stored["model"] and stored["model"][key] != value:
                differences.append(f"model.{key} = {value!r} (the run has {stored['model'][key]!r})")
    if differences:
        raise UserError(f"cannot resume {out} with other settings: {'; '.join(differences)} ({where}); "
                        f"only train.* settings may change")


def say(text: str) -> None:
    """A progress note for the user, on stderr (stdout is for results)."""
    print(text, file=sys.stderr)
