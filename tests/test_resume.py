"""Every training verb resumes: the same command plus `resume` continues a killed run exactly, and only
a setting that differs from the run's is refused (naming it).

A run is killed with SIGKILL in a child process after a checkpoint; resumed in this process, it ends
with the same per-step losses and the same weights as a run never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.errors import UserError
from lmforge.recipes.classify import train_classifier
from lmforge.recipes.finetune import finetune

WORDS = "king queen river garden night song bird forest".split()
SCRIPT = Path(__file__).parent / "scripts" / "run_verb.py"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny pretrained model, chat data and labelled data, all made here."""
    root = tmp_path_factory.mktemp("resume")
    text = " ".join(f"the {a} and the {b}." for a in WORDS for b in WORDS) * 3
    (root / "a.txt").write_text(text)
    lmforge.prepare(root / "a.txt", root / "data", vocab_size=300, clean=False)
    lmforge.pretrain(root / "data", root / "run", preset="tiny",
                     overrides={"model.block_size": 64, "train.max_steps": 4, "train.eval_interval": 4,
                                "train.eval_batches": 1, "train.precision": "fp32"})
    with open(root / "chat.jsonl", "w") as f:
        for i in range(48):
            word = WORDS[i % len(WORDS)]
            messages = [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": f"{word}!"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(root / "labels.jsonl", "w") as f:
        for i in range(48):
            a, b = WORDS[i % 8], WORDS[(i * 3) % 8]
            f.write(json.dumps({"text": f"the {a} sings to the {b}", "label": "pos" if i % 2 else "neg"}) + "\n")
    return root


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def checkpoint_step(run: Path) -> int:
    path = run / "checkpoint" / "trainer_state.pt"
    return torch.load(path, weights_only=True)["step"] if path.is_file() else 0


def kill_after_a_checkpoint(function: str, kwargs: dict, run: Path, at_least: int) -> int:
    """Run `function(**kwargs)` in a child process, SIGKILL it once its checkpoint holds step >= `at_least`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(SCRIPT), function, json.dumps(kwargs), "--step-sleep", "0.3"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while child.poll() is None and time.monotonic() < deadline:
        try:
            if checkpoint_step(run) >= at_least:
                break
        except (RuntimeError, OSError, EOFError):  # the checkpoint is being replaced right now
            pass
        time.sleep(0.05)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read()[-2000:]}"
    child.send_signal(signal.SIGKILL)
    child.wait()
    return checkpoint_step(run)


def assert_same_run(resumed: Path, uninterrupted: Path, weights: str) -> None:
    assert losses(resumed) == losses(uninterrupted)
    a, b = load_file(resumed / "checkpoint" / weights), load_file(uninterrupted / "checkpoint" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TRAIN = {"train.batch_size": 4, "train.eval_interval": 2, "train.max_steps": 8, "train.precision": "fp32",
         "train.keep_best": False}


def test_lora_finetuning_resumes_exactly_after_a_kill(base, tmp_path):
    kwargs = {"model": str(base / "run"), "data": str(base / "chat.jsonl"), "method": "lora", "lora_dropout": 0.1,
              "overrides": {**TRAIN, "train.lr": 1e-3}}
    finetune(**kwargs, out=tmp_path / "whole")
    killed = tmp_path / "killed"
    step = kill_after_a_checkpoint("lmforge.recipes.finetune:finetune", {**kwargs, "out": str(killed)}, killed, 2)
    assert 2 <= step < 8
    assert finetune(**kwargs, out=killed, resume=True)["step"] == 8
    assert_same_run(killed, tmp_path / "whole", "adapter_model.safetensors")


def test_classification_resumes_exactly_after_a_kill(base, tmp_path):
    kwargs = {"model": str(base / "run"), "data": str(base / "labels.jsonl"), "method": "lora",
              "overrides": TRAIN}
    train_classifier(**kwargs, out=tmp_path / "whole")
    killed = tmp_path / "killed"
    step = kill_after_a_checkpoint("lmforge.recipes.classify:train_classifier", {**kwargs, "out": str(killed)},
                                   killed, 2)
    assert 2 <= step < 8
    assert train_classifier(**kwargs, out=killed, resume=True)["step"] == 8
    assert_same_run(killed, tmp_path / "whole", "classifier.safetensors")
    assert_same_run(killed, tmp_path / "whole", "adapter_model.safetensors")


def test_the_same_pretrain_command_resumes_and_a_changed_model_is_refused_by_name(base, tmp_path):
    command = ["pretrain", "--data", str(base / "data"), "--out", str(tmp_path / "run"), "--preset", "tiny",
               "--model.block_size", "64", "--train.max_steps", "2", "--train.eval_batches", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "lmforge"]
    assert subprocess.run(run + command, env=env, capture_output=True).returncode == 0
    more = command[:-4] + ["--train.max_steps", "4", "--train.eval_batches", "1", "--resume"]
    done = subprocess.run(run + more, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert max(losses(tmp_path / "run")) == 4
    changed = subprocess.run(run + more + ["--model.n_layer", "3"], env=env, capture_output=True, text=True)
    assert changed.returncode == 2 and "model.n_layer = 3 (the run has 2)" in changed.stderr
    assert "Traceback" not in changed.stderr and checkpoint_step(tmp_path / "run") == 4


def test_resuming_with_other_adapters_is_refused_by_name(base, tmp_path):
    kwargs = {"model": str(base / "run"), "data": str(base / "chat.jsonl"), "method": "lora",
              "overrides": {**TRAIN, "train.max_steps": 2}}
    finetune(**kwargs, out=tmp_path / "run")
    with pytest.raises(UserError, match="lora = .*'rank': 4"):
        finetune(**kwargs, lora_rank=4, out=tmp_path / "run", resume=True)
    with pytest.raises(UserError, match="holds no run"):
        finetune(**kwargs, out=tmp_path / "nothing", resume=True)
