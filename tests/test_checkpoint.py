"""Checkpoint integrity (lmforge.train.checkpoint): every file is recorded in lmforge.json, and every
load verifies the checkpoint first, so that a truncated or altered file is a one-line UserError naming
it (exit 2 from the CLI), never a library's own exception. Checkpoints written before the record
existed get the structural checks. Crash safety of the Trainer's checkpoints is in test_trainer.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.train.checkpoint import (
    load_checkpoint,
    load_trainer_state,
    read_info,
    resolve_checkpoint,
    save_checkpoint,
    verified_checkpoint,
    verify_checkpoint,
)


@pytest.fixture(scope="module")
def saved(make_model, tokenizer, tmp_path_factory) -> Path:
    """A whole checkpoint with weights, tokenizer, info and trainer state (tests damage copies of it)."""
    directory = tmp_path_factory.mktemp("saved") / "checkpoint"
    state = {"step": 3, "optimizer": {"state": {}, "param_groups": []}}
    return save_checkpoint(directory, make_model("gpt2"), tokenizer, {"step": 3}, trainer_state=state)


def copy_of(checkpoint: Path, tmp_path: Path, recorded: bool = True) -> Path:
    """A copy to damage; without `recorded`, as written before lmforge.json recorded the files."""
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    if not recorded:
        info = json.loads((copy / "lmforge.json").read_text())
        del info["files"]
        (copy / "lmforge.json").write_text(json.dumps(info))
    return copy


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_one_line_error(load: Callable[[], object], *fragments: str) -> str:
    with pytest.raises(UserError) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------------------------


def test_save_records_every_file_and_read_info_leaves_the_record_out(saved) -> None:
    info = json.loads((saved / "lmforge.json").read_text())
    names = {p.name for p in saved.iterdir()} - {"lmforge.json"}
    assert set(info["files"]) == names == {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"}
    for name, record in info["files"].items():
        data = (saved / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert verify_checkpoint(saved) == info
    assert read_info(saved) == {"versions": info["versions"], "step": 3}
    assert load_trainer_state(saved)["step"] == 3
    assert load_checkpoint(saved).tokenizer is not None


RECORDED_DAMAGE = {
    "truncated weights": (lambda d: truncate(d / "model.safetensors"), "model.safetensors", "lmforge.json records"),
    "flipped header byte": (lambda d: flip_byte(d / "model.safetensors", 9), "model.safetensors", "sha256"),
    "flipped data byte": (lambda d: flip_byte(d / "model.safetensors", -3), "model.safetensors", "sha256"),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json", "is missing"),
    "truncated trainer state": (lambda d: truncate(d / "trainer_state.pt", 0.9), "trainer_state.pt", "records"),
    "config.json rewritten": (lambda d: (d / "config.json").write_text("{not json"), "config.json", "records"),
}


@pytest.mark.parametrize("case", RECORDED_DAMAGE)
def test_every_load_path_refuses_a_damaged_checkpoint(saved, tmp_path, case: str) -> None:
    damaged = copy_of(saved, tmp_path)
    load_checkpoint(damaged)  # the copy is whole
    damage, file, problem = RECORDED_DAMAGE[case]
    damage(damaged)
    for load in (lambda: load_checkpoint(damaged), lambda: read_info(damaged),
                 lambda: load_trainer_state(damaged), lambda: verified_checkpoint(damaged)):
        assert_one_line_error(load, "damaged checkpoint", str(damaged / file), problem)


UNRECORDED_DAMAGE = {
    "truncated weights": (lambda d: truncate(d / "model.safetensors"), "model.safetensors", "header describes"),
    "weights cut inside the header": (lambda d: truncate(d / "model.safetensors", 0.001), "model.safetensors",
                                      "no readable safetensors header"),
    "flipped header length": (lambda d: flip_byte(d / "model.safetensors", 5), "model.safetensors",
                              "no readable safetensors header"),
    "flipped header byte": (lambda d: flip_byte(d / "model.safetensors", 8), "model.safetensors",
                            "no readable safetensors header"),
    "truncated trainer state": (lambda d: truncate(d / "trainer_state.pt", 0.9), "trainer_state.pt",
                                "not a readable torch archive"),
    "lmforge.json not JSON": (lambda d: (d / "lmforge.json").write_text('{"step": 3'), "lmforge.json",
                              "not valid JSON"),
    "tokenizer.json not JSON": (lambda d: truncate(d / "tokenizer.json"), "tokenizer.json", "not valid JSON"),
}


@pytest.mark.parametrize("case", UNRECORDED_DAMAGE)
def test_checkpoints_without_a_record_get_the_structural_checks(saved, tmp_path, case: str) -> None:
    old = copy_of(saved, tmp_path, recorded=False)
    assert load_checkpoint(old).tokenizer is not None and load_trainer_state(old)["step"] == 3  # still loads
    damage, file, problem = UNRECORDED_DAMAGE[case]
    damage(old)
    assert_one_line_error(lambda: load_checkpoint(old), str(old / file), problem)


def test_a_record_of_the_wrong_shape_is_a_user_error(saved, tmp_path) -> None:
    damaged = copy_of(saved, tmp_path)
    (damaged / "lmforge.json").write_text(json.dumps({"files": ["model.safetensors"]}))
    assert_one_line_error(lambda: read_info(damaged), str(damaged / "lmforge.json"), "not an lmforge record")


def lmforge_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("damage", ["truncated", "flipped header byte"])
def test_the_cli_reports_a_damaged_checkpoint_in_one_line(saved, tmp_path, damage: str) -> None:
    damaged = copy_of(saved, tmp_path)
    weights = damaged / "model.safetensors"
    if damage == "truncated":
        truncate(weights)
    else:
        flip_byte(weights, 12)
    result = lmforge_cli("generate", str(damaged), "--prompt", "a", "--max-new-tokens", "2")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge generate: error: damaged checkpoint: "), lines
    assert str(weights) in lines[0]


def test_a_damaged_adapter_checkpoint_is_refused_before_its_base_is_loaded(make_model, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from lmforge.api import load

    adapters = peft.get_peft_model(make_model("gpt2"), peft.LoraConfig(r=2, target_modules=["qkv"]))
    directory = save_checkpoint(tmp_path / "lora", adapters, info={"base": str(tmp_path / "no-such-base")})
    assert read_info(directory)["base"] == str(tmp_path / "no-such-base")
    flip_byte(directory / "adapter_model.safetensors", -1)
    for loader in (lambda: read_info(directory), lambda: verified_checkpoint(tmp_path / "lora"),
                   lambda: load(directory)):
        assert_one_line_error(loader, "damaged checkpoint", str(directory / "adapter_model.safetensors"))


def test_a_run_directory_resolves_to_its_checkpoint_or_else_the_previous_one(saved, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(saved, run / ".checkpoint.tmp-abc")  # an unfinished save: never picked
    with pytest.raises(UserError, match="not an lmforge checkpoint"):
        resolve_checkpoint(run)
    shutil.copytree(saved, run / "checkpoint.prev")  # a crash between the two renames of a save
    assert resolve_checkpoint(run) == run / "checkpoint.prev"
    shutil.copytree(saved, run / "checkpoint")
    assert resolve_checkpoint(run) == run / "checkpoint"
    (run / "checkpoint" / "config.json").unlink()  # a broken `checkpoint/` is not passed over for an older one
    with pytest.raises(UserError, match="not an lmforge checkpoint"):
        resolve_checkpoint(run)
