"""Differential privacy (DP-SGD through Opacus) in the one Trainer: per-example gradients equal single-example
backward passes (full and LoRA, GPT-2 and Llama style, classifier), epsilon is logged and stored and the run stops
at its budget, the noise is not reproducible from the seed, the canary exposure test, and one-line errors."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmforge
from lmforge.cli import main
from lmforge.config import TrainConfig
from lmforge.data.batches import EpochBatches
from lmforge.data.sft import IGNORE, Example, collate
from lmforge.errors import UserError
from lmforge.recipes.finetune import apply_lora, finetune
from lmforge.train.trainer import Trainer

pytest.importorskip("opacus")
WORDS = "king queen river garden night song bird forest".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny pretrained model (a real tokenizer, shards and a short pretraining run; a context that holds a whole
    canary conversation) and chat data."""
    root = tmp_path_factory.mktemp("dp")
    text = " ".join(f"the {a} and the {b}." for a in WORDS for b in WORDS) * 10
    (root / "a.txt").write_text(text)
    lmforge.prepare(str(root / "a.txt"), root / "data", vocab_size=300, clean=False)
    lmforge.pretrain(root / "data", root / "run", preset="tiny",
                     overrides={"model.block_size": 160, "train.max_steps": 10, "train.eval_interval": 10,
                                "train.eval_batches": 1, "train.precision": "fp32"})
    with open(root / "chat.jsonl", "w") as f:
        for i in range(40):
            word = WORDS[i % len(WORDS)]
            messages = [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": f"{word}!"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def random_examples(n: int, vocab: int, seed: int) -> list[Example]:
    """Examples of different lengths whose first tokens are a prompt (no loss): padding and IGNORE both occur."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append(Example(name=f"example{i}", ids=ids, labels=[IGNORE, IGNORE] + ids[2:]))
    return out


def dp_trainer(model: nn.Module, batches, tmp_path: Path, loss_fn=None, **train) -> Trainer:
    settings = dict(batch_size=4, max_steps=4, eval_interval=4, warmup_steps=0, dp_epsilon=8.0, device="cpu")
    config = TrainConfig(**{**settings, **train})
    kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
    return Trainer(model, config, tmp_path / "run", batches=batches, **kwargs)


def check_per_example_gradients(trainer: Trainer, reference: nn.Module, batch: dict, single_losses) -> int:
    """The per-example gradients Opacus computes in the Trainer's DP pass equal, for every example, the gradient
    of that example's own loss in a plain backward pass of an identical model; returns the parameters compared."""
    privacy = trainer.privacy
    with privacy.per_example_loss():
        loss = trainer.loss_fn(privacy.module, batch)
    loss.backward()
    rows = len(single_losses)
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    samples = {name: p.grad_sample for name, p in trainer.model.named_parameters() if p.requires_grad}
    reference_params = dict(reference.named_parameters())
    for i in range(rows):
        reference.zero_grad(set_to_none=True)
        single_losses[i](reference).backward()
        for name in names:
            expected = reference_params[name].grad
            got = samples[name][i]  # of the mean loss, times the rows (loss_reduction="mean"): example i's own
            expected = torch.zeros_like(got) if expected is None else expected
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (name, i, (got - expected).abs().max())
    return len(names)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_per_example_gradients_equal_single_example_backward_passes(make_model, tmp_path, style, method):
    model = make_model(style, seed=0, dropout=0.0)
    if method == "lora":
        model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["qkv", "proj", "up", "down"])
        torch.manual_seed(1)  # LoRA's B starts at zero: give the adapters values so every gradient is non-trivial
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    reference = copy.deepcopy(model).train()
    examples = random_examples(4, 384, seed=2)
    batches = EpochBatches(examples, 4, seed=0, collate=lambda items, step, part: collate(items, pad_id=0))
    trainer = dp_trainer(model, batches, tmp_path)
    assert trainer.kernels["applied"] == {}  # no training kernels under DP
    model.train()
    batch = batches.select([0, 1, 2, 3], 0, 0)  # lengths 6, 9, 12, 15: padded rows

    def single(i: int):
        row = collate([examples[i]], pad_id=0)  # the example alone, unpadded, through the usual fused loss
        return lambda m: m(row["ids"], targets=row["targets"])

    compared = check_per_example_gradients(trainer, reference, batch, [single(i) for i in range(4)])
    assert compared == (len([p for p in reference.parameters() if p.requires_grad]))
    assert compared > (10 if method == "full" else 4)


def test_per_example_gradients_of_a_lora_classifier(tmp_path, tokenizer, make_model):
    from lmforge.recipes.classify import Classifier, classification_loss

    backbone = apply_lora(make_model("llama", seed=0), rank=4, alpha=8, dropout=0.0, target_modules=["qkv", "down"])
    model = Classifier(backbone, ["bad", "good"], max_length=32)
    reference = copy.deepcopy(model).train()
    texts = ["so lovely a summer", "death and rough winds", "the fair gold of thy", "shade"]
    rows = [tokenizer.encode(t) for t in texts]
    from lmforge.infer import pad_right

    def make(picks, step, part):
        ids, mask = pad_right([rows[i] for i in picks], tokenizer.eos_id)
        return {"ids": ids, "lengths": mask.sum(1), "labels": torch.tensor([i % 2 for i in picks])}

    batches = EpochBatches(range(4), 4, seed=0, collate=make)
    trainer = dp_trainer(model, batches, tmp_path, loss_fn=classification_loss)
    model.train()
    singles = [lambda m, i=i: classification_loss(m, make([i], 0, 0)) for i in range(4)]
    assert check_per_example_gradients(trainer, reference, make([0, 1, 2, 3], 0, 0), singles) >= 4


def test_dp_finetune_from_the_cli_logs_and_stores_epsilon(base):
    out = base / "dp-cli"
    result = run_cli("finetune", str(base / "run"), str(base / "chat.jsonl"), "--out", str(out), "--method", "lora",
                     "--epochs", "3", "--train.batch_size", "8", "--train.grad_accum", "2", "--train.lr", "3e-3",
                     "--train.dp.epsilon", "4", "--train.dp.max_grad_norm", "0.5")
    assert result.returncode == 0, result.stderr
    evaluations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in evaluations if "val_loss" in r]
    epsilons = [r["epsilon"] for r in evaluations]
    assert len(epsilons) == 3 and epsilons == sorted(epsilons) and epsilons[0] > 0
    assert 3.5 < epsilons[-1] <= 4.0  # the noise was calibrated to spend the budget over the run, not more
    assert "epsilon" in result.stdout  # the evaluation lines
    privacy = json.loads((out / "checkpoint" / "lmforge.json").read_text())["privacy"]
    assert privacy["epsilon"] == epsilons[-1] and privacy["target_epsilon"] == 4.0
    assert privacy["delta"] == pytest.approx(1 / 36) and privacy["sample_rate"] == pytest.approx(8 / 36)
    assert privacy["max_grad_norm"] == 0.5 and privacy["noise_multiplier"] > 0.3
    assert privacy["sampling"] == "poisson" and privacy["accountant"] == "prv"
    assert json.loads((out / "best" / "lmforge.json").read_text())["privacy"]["epsilon"] <= 4.0
    model = lmforge.load(out)  # loads as any other
    assert model(torch.tensor([[1, 2, 3]])).shape[-1] == model.config.vocab_size


def test_the_noise_is_not_reproducible_from_the_seed_and_the_budget_stops_a_longer_resume(base, capsys):
    def run(name: str, **extra):
        return finetune(base / "run", base / "chat.jsonl", base / name, method="full", epochs=1,
                        overrides={"train.batch_size": 8, "train.lr": 1e-3, "train.dp_epsilon": 8.0, **extra})

    run("dp-a")
    run("dp-b")
    a, b = lmforge.load(base / "dp-a"), lmforge.load(base / "dp-b")
    assert not torch.equal(a.tok_emb.weight, b.tok_emb.weight)  # same seed, fresh noise and sampling
    steps = json.loads((base / "dp-a" / "checkpoint" / "lmforge.json").read_text())["step"]
    summary = finetune(base / "run", base / "chat.jsonl", base / "dp-a", method="full", epochs=1, resume=True,
                       overrides={"train.batch_size": 8, "train.lr": 1e-3, "train.dp_epsilon": 8.0,
                                  "train.max_steps": steps + 5})
    assert summary["step"] == steps  # nothing more: the budget of the first run is spent
    assert "privacy budget" in capsys.readouterr().out


def test_dp_pretraining_samples_disjoint_windows(base):
    out = base / "dp-pretrain"
    result = run_cli("pretrain", "--data", str(base / "data"), "--out", str(out), "--preset", "tiny",
                     "--model.block_size", "32", "--train.max_steps", "4", "--train.eval_interval", "4",
                     "--train.batch_size", "8", "--train.eval_batches", "1", "--train.dp.epsilon", "8")
    assert result.returncode == 0, result.stderr
    privacy = json.loads((out / "checkpoint" / "lmforge.json").read_text())["privacy"]
    tokens = (base / "data" / "train.bin").stat().st_size // 2  # uint16 tokens
    assert privacy["examples"] == tokens // 33 and privacy["epsilon"] <= 8.0


class SharedWeight(nn.Module):
    """A toy LM whose output weight is used by a function call, not by its module's forward (as a fused loss does)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 50)

    def forward(self, ids, targets=None):
        logits = F.linear(self.emb(ids), self.out.weight, self.out.bias)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_a_parameter_opacus_cannot_see_is_named(tmp_path):
    batches = EpochBatches(list(range(8)), 4, seed=0, collate=lambda items, step, part: {
        "ids": torch.tensor([[i, i + 1, i + 2] for i in items]), "targets": torch.tensor([[i + 1] * 3 for i in items])})
    trainer = dp_trainer(SharedWeight(), batches, tmp_path, max_steps=1)
    with pytest.raises(UserError, match=r"out\.weight .*used outside its module's forward"):
        trainer.fit()


@pytest.mark.parametrize("flags, fragment", [
    (["--train.dp.epsilon", "0"], "train.dp.epsilon = 0.0; expected a positive number"),
    (["--train.dp.epsilon", "-1"], "train.dp.epsilon = -1.0; expected a positive number"),
    (["--train.dp.epsilon", "3", "--train.dp.delta", "1"], "train.dp.delta = 1.0; expected a value between 0 and 1"),
    (["--train.dp.epsilon", "3", "--train.precision", "bf16"], "DP trains in fp32"),
    (["--train.dp.epsilon", "3", "--train.batch_size", "64"], "is more than the 36 training examples"),
    (["--train.dp.epsilon", "3", "--train.activation_checkpointing", "true"], "activation_checkpointing"),
])
def test_bad_privacy_settings_are_one_line_errors(base, flags, fragment, capsys):
    out = base / "dp-bad"
    code = main(["finetune", str(base / "run"), str(base / "chat.jsonl"), "--out", str(out), "--method", "lora",
                 "--epochs", "1", *flags])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("lmforge finetune: error:")]
    assert code == 2 and len(errors) == 1 and fragment in errors[0] and "Traceback" not in stderr, stderr
    assert not (out / "checkpoint").exists()



def test_exposure_finds_a_memorised_canary_and_not_one_never_seen(base):
    from lmforge.eval.exposure import exposure, make_canaries

    inserted, never = make_canaries(["Alice", "Bob"], seed=1)
    records = [json.loads(line) for line in (base / "chat.jsonl").read_text().splitlines()]
    out = base / "canary"
    finetune(base / "run", records + [inserted.conversation()] * 20, out, method="full", epochs=6,
             val_data=records[:4], overrides={"train.lr": 3e-3, "train.batch_size": 8, "train.precision": "fp32"})
    model = lmforge.load(out / "checkpoint")
    seen = exposure(model, inserted.prompt(model.tokenizer), inserted.secret, samples=500)
    unseen = exposure(model, never.prompt(model.tokenizer), never.secret, samples=500)
    assert seen["preferred"] == 0 and seen["sampled_exposure"] == pytest.approx(math.log2(500), abs=0.1)
    assert seen["exposure"] > 12 and unseen["exposure"] < 6, (seen, unseen)
