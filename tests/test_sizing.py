"""Sizing a run to its corpus and budget, the Muon optimizer, and holding out a single file by sections.

The sizing rules are checked with a throughput that follows the model's FLOPs (so the decision is
deterministic) and once with the real measurement on a tiny run; Muon trains a real model, which
must learn and resume exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.config import ModelConfig, TrainConfig
from lmforge.data import Document
from lmforge.data.shards import sections, split_documents
from lmforge.models.decoder import flops_per_token
from lmforge.recipes.sizing import (
    SHAPES,
    TOKENS_PER_PARAMETER,
    Sizing,
    measure_throughput,
    model_config,
    non_embedding_parameters,
    plan_run,
    vocab_for,
)
from lmforge.train.optim import Optimizers, build_optimizer, for_muon, lr_at


def flops_bound(flops_per_s: float):
    """A machine that trains at `flops_per_s` whatever the shape: tokens/s = FLOP/s / FLOPs per token."""
    def measure(model: ModelConfig, train: TrainConfig) -> float:
        return flops_per_s / flops_per_token(model)
    return measure


def test_vocabulary_follows_the_corpus() -> None:
    on = Sizing()
    assert vocab_for(5_057_239, on) == 1024  # Shakespeare: about one token type per 5,000 bytes
    assert vocab_for(1_000, on) == 512 and vocab_for(0, on) == 512
    assert vocab_for(10**9, on) == 8192
    assert vocab_for(5_057_239, Sizing(small_vocab=False)) == 8192
    sizes = [vocab_for(n, on) for n in (10**5, 10**6, 5 * 10**6, 2 * 10**7, 10**8)]
    assert sizes == sorted(sizes) and all(s & (s - 1) == 0 for s in sizes)  # powers of two, never shrinking


def test_the_model_grows_with_the_budget_and_the_machine() -> None:
    plans = {(minutes, speed): plan_run(5_000_000, minutes, 2048, flops_bound(speed), Sizing())
             for minutes in (1, 5, 60) for speed in (1e11, 1e12)}
    sizes = {k: non_embedding_parameters(p.model) for k, p in plans.items()}
    assert sizes[(1, 1e11)] <= sizes[(5, 1e11)] <= sizes[(60, 1e11)]
    assert sizes[(5, 1e11)] <= sizes[(5, 1e12)]
    assert sizes[(1, 1e11)] < sizes[(60, 1e12)]
    for (minutes, speed), plan in plans.items():
        n = non_embedding_parameters(plan.model)
        seconds = 0.9 * 60 * minutes
        tokens = plan.tokens_per_s * seconds
        shape = (plan.model.n_layer, plan.model.d_model)
        assert tokens >= TOKENS_PER_PARAMETER * n or shape == SHAPES[0]  # compute-optimal: enough tokens
        if shape != SHAPES[-1]:  # ... and the next shape up would have too few
            bigger = model_config(SHAPES[SHAPES.index(shape) + 1], 2048, Sizing())
            assert speed / flops_per_token(bigger) * seconds < TOKENS_PER_PARAMETER * non_embedding_parameters(bigger)
        batch, block = plan.train["batch_size"], plan.model.block_size
        assert plan.train["max_steps"] == max(10, int(tokens / (batch * block)))
        assert plan.model.norm == "rmsnorm" and plan.model.mlp == "swiglu" and plan.model.position == "rope"
        assert plan.train["optimizer"] == "muon" and plan.train["schedule"] == "wsd"
        assert plan.train["lr"] == 1e-3  # high_lr is off by default (it lost the ablation)
        high = plan_run(5_000_000, minutes, 2048, flops_bound(speed), Sizing(high_lr=True))
        assert high.train["lr"] == 3e-3 * min(1.0, 256 / high.model.d_model)
        assert "tokens per parameter" in plan.describe() and "--model.n_layer" in plan.describe()


def test_every_rule_off_is_the_old_demo_and_given_settings_are_kept() -> None:
    old = plan_run(5_000_000, 3, 8192, flops_bound(1e11), Sizing.off())
    m = old.model
    assert (m.n_layer, m.d_model, m.n_head, m.block_size, m.norm, m.mlp, m.position) == \
        (4, 256, 4, 256, "layernorm", "gelu", "learned")
    t = old.train
    assert (t["batch_size"], t["lr"], t["min_lr"], t["optimizer"], t["schedule"]) == (8, 1e-3, 1e-4, "adamw", "cosine")
    assert t["warmup_steps"] == max(1, t["max_steps"] // 20)
    # nanoGPT's shape, given: the steps are sized to it (its batch of 12 x 64 tokens)
    given = {"model.n_layer": 4, "model.d_model": 128, "model.block_size": 64, "train.batch_size": 12}
    nano = plan_run(5_000_000, 3, 258, flops_bound(1e11), Sizing.off(), given=given)
    assert (nano.model.d_model, nano.model.block_size, nano.train["batch_size"]) == (128, 64, 12)
    assert nano.train["max_steps"] == int(0.9 * 180 * nano.tokens_per_s / (12 * 64))
    # a preset keeps its shape; the other rules still apply
    mini = plan_run(5_000_000, 3, 2048, flops_bound(1e11), Sizing(), preset="gpt-mini")
    assert (mini.model.n_layer, mini.model.d_model, mini.model.norm) == (6, 384, "layernorm")
    assert mini.train["optimizer"] == "muon"


def test_measured_throughput_and_a_sized_pretrain_run(shards: Path, tmp_path: Path) -> None:
    tiny = ModelConfig(vocab_size=384, block_size=32, n_layer=1, n_head=2, d_model=32).validate()
    assert measure_throughput(tiny, TrainConfig(batch_size=4, precision="fp32", optimizer="muon")) > 0
    summary = lmforge.pretrain(shards, tmp_path / "run", overrides={"train.max_minutes": 0.02,
                                                                     "train.precision": "fp32"})
    run = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    train = json.loads((tmp_path / "run" / "checkpoint" / "lmforge.json").read_text())["train"]
    assert (run["n_layer"], run["d_model"], run["norm"]) == (*SHAPES[0], "rmsnorm")  # 0.02 min: the smallest
    assert run["block_size"] <= 256
    assert train["optimizer"] == "muon" and train["schedule"] == "wsd" and train["max_minutes"] == 0.02
    assert summary["step"] >= 1 and "val_bpb" in summary


def test_muon_for_hidden_matrices_and_adamw_for_the_rest(make_model) -> None:
    model = make_model("llama", tie_embeddings=False)
    named = list(model.named_parameters())
    chosen = {name for name, p in named if for_muon(name, p)}
    assert chosen and all(".attn." in n or ".mlp." in n for n in chosen)
    assert not any("emb" in n or n.startswith("head") or "norm" in n for n in chosen)
    config = TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.04)
    optimizer = build_optimizer([n for n, _ in named], [p for _, p in named], config)
    assert isinstance(optimizer, Optimizers)
    assert isinstance(optimizer.optimizers["muon"], torch.optim.Muon)
    assert {g.get("lr_scale", 1.0) for g in optimizer.param_groups} == {1.0, 20.0}
    assert isinstance(build_optimizer([n for n, _ in named], [p for _, p in named], TrainConfig()),
                      torch.optim.AdamW)


def test_wsd_schedule_holds_then_warms_down_to_min_lr() -> None:
    config = TrainConfig(lr=1e-2, min_lr=0.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.4)
    lrs = [lr_at(step, config) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(lr == pytest.approx(1e-2) for lr in lrs[10:61])
    assert lrs[80] == pytest.approx(5e-3) and lrs[100] == 0.0
    assert all(a >= b for a, b in zip(lrs[60:], lrs[61:]))


def muon_run(shards: Path, out: Path, resume: bool = False) -> dict:
    overrides = {"model.n_layer": 2, "model.d_model": 32, "model.n_head": 2, "model.block_size": 32,
                 "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.position": "rope", "model.bias": False,
                 "train.optimizer": "muon", "train.schedule": "wsd", "train.lr": 3e-3, "train.batch_size": 8,
                 "train.max_steps": 40, "train.warmup_steps": 4, "train.eval_interval": 20, "train.eval_batches": 2,
                 "train.log_interval": 1, "train.precision": "fp32"}
    return lmforge.pretrain(shards, out, overrides=overrides, resume=resume)


def test_muon_learns_and_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    muon_run(shards, full)
    losses = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # it learns
    state = torch.load(full / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert set(state["optimizer"]) == {"adamw", "muon"} and state["optimizer"]["muon"]["state"]
    # the run as if killed after step 20: its newest checkpoint gone, the one of step 20 left
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoint")
    assert muon_run(shards, resumed, resume=True)["step"] == 40
    a, b = load_file(full / "checkpoint" / "model.safetensors"), load_file(resumed / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SCENES = "".join(f"ACT {act}.\n\n" + "".join(f"Scene {scene}. A room.\n\n" + "Speaker.\nA line of verse.\n" * 20
                                             for scene in ("I", "II", "III", "IV"))
                 for act in ("I", "II", "III"))


def test_a_single_file_is_held_out_by_whole_scenes() -> None:
    parts = sections(Document("play.txt", SCENES))
    assert len(parts) == 12 and "".join(p.text for p in parts) == SCENES
    assert parts[0].text.startswith("ACT I.\n\nScene I.") and parts[1].text.startswith("Scene II.")  # acts join
    train, val = split_documents([Document("play.txt", SCENES)], 0.2)
    assert "".join(d.text for d in sorted(train + val, key=lambda d: int(d.name.split("#")[1].split("-")[0]))) == SCENES
    for doc in val:
        assert doc.text.lstrip().startswith(("Scene", "ACT")), doc.name  # whole scenes only
    scene_texts = {p.text for p in parts}
    held = [p for p in parts if any(p.text in d.text for d in val)]
    assert held and all(p.text in scene_texts for p in held)
    assert 0.15 < sum(len(d.text) for d in val) / len(SCENES) < 0.45
    # the same file splits the same way
    assert [d.name for d in split_documents([Document("play.txt", SCENES)], 0.2)[1]] == [d.name for d in val]


def test_a_single_file_without_headings_is_held_out_by_blank_line_breaks_or_cut() -> None:
    stories = "".join(f"Story {i}.\n" + "Once upon a time there was a tale.\n" * 8 + "\n\n\n" for i in range(10))
    train, val = split_documents([Document("stories.txt", stories)], 0.2)
    assert all(d.text.startswith("Story ") for d in val) and len(train) + len(val) >= 2
    lines = "".join(f"line {i}\n" for i in range(100))  # no sections: the tail, as before
    train, val = split_documents([Document("only", lines)], 0.1)
    assert [d.name for d in val] == ["only[val]"]
