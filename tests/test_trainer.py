"""Tests of lmforge.train: the real Trainer on tiny models and tiny data.

Loss goes down; a run killed with SIGKILL and resumed equals an uninterrupted run exactly (fp32 and
bf16), and so does a run stopped by SIGTERM (which saves a checkpoint first); two processes under
torchrun equal one; gradient accumulation equals one big batch; the run directory and checkpoint hold
what they promise; a crash while saving (even between the two renames of a swap) keeps a checkpoint
to resume from, and so does a damaged newest checkpoint. The runs that must be separate processes use
tests/scripts/train_tiny.py (and train_tiny_cli.py, which exits as the CLI does when interrupted).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import TrainConfig
from lmforge.errors import Interrupted, UserError
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import SHARDED, load_checkpoint, read_info, save_checkpoint, sharded_weights
from lmforge.train.objectives import RandomWindows, evaluate_tokens
from lmforge.train.trainer import Trainer

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
CLI_SCRIPT = SCRIPT.with_name("train_tiny_cli.py")
TIMING_KEYS = ("tokens_per_s", "mfu")
# Gradients summed in another order (two processes, micro-batches) differ by rounding, which AdamW
# turns into weights that differ by up to ~3e-6 after 5 steps where a gradient is near zero (its
# update is about sign(gradient) * lr). 1/300 of what 5 steps can move a weight (lr * 5 = 1.5e-2):
WEIGHTS_ATOL = 5e-5


@pytest.fixture(scope="module")
def train_tiny():
    """tests/scripts/train_tiny.py as a module: `build(argv)` gives a Trainer, `main(argv)` runs one."""
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def argv(shards: Path, out: Path, **options) -> list[str]:
    args = ["--data", str(shards), "--out", str(out)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def child_env() -> dict[str, str]:
    # one thread per process: deterministic, and two processes share the two cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(args: list[str], log: Path, launcher: list[str] | None = None, script: Path = SCRIPT) -> subprocess.Popen:
    """Start the script in its own process group (so torchrun's workers can be stopped with it)."""
    with open(log, "wb") as f:
        return subprocess.Popen([*(launcher or [sys.executable]), str(script), *args], stdout=f,
                                stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """SIGKILL a process started by `start` and everything it started; wait for it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def read_metrics(run: Path) -> list[dict]:
    """The records of metrics.jsonl, skipping a last line that is still being written."""
    path = run / "metrics.jsonl"
    records = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def checkpoint_step(run: Path) -> int | None:
    try:
        return json.loads((run / "checkpoint" / "lmforge.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoint" / "model.safetensors")


def assert_same_run(expected: Path, got: Path, steps: int) -> None:
    """Two runs with the same metrics (timing aside), every step logged once, the same weights and AdamW state."""
    assert [r["step"] for r in read_metrics(got) if "loss" in r] == list(range(1, steps + 1))
    assert without_timing(read_metrics(got)) == without_timing(read_metrics(expected))  # losses, lrs, evals
    a, b = weights(expected), weights(got)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_a, state_b = optimizer_state(expected), optimizer_state(got)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def optimizer_state(run: Path) -> dict[tuple, torch.Tensor]:
    """AdamW's tensors in the run's checkpoint: from trainer_state.pt, or from FSDP's shards."""
    checkpoint = run / "checkpoint"
    if (checkpoint / SHARDED).is_dir():
        return {(k,): v for k, v in sharded_weights(checkpoint / SHARDED, "optimizer").items()}
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    return {(i, key): value for i in state for key, value in state[i].items()}


# ----------------------------------------------------------------------------------------------


def test_loss_goes_down_on_repetitive_text(tokenizer, make_config, tmp_path) -> None:
    tokens = np.array(tokenizer.encode("the cat sat on the mat, and the dog sat on the log. " * 40))
    torch.manual_seed(0)
    model = Decoder(make_config("gpt2", vocab_size=tokenizer.vocab_size))
    config = TrainConfig(batch_size=8, max_steps=30, lr=1e-2, min_lr=1e-3, warmup_steps=3, precision="fp32",
                         eval_interval=15, log_interval=1)

    def evaluate(m):
        return {"val_loss": evaluate_tokens(m, tokens[:200], 32)["loss"]}

    before = evaluate(model)["val_loss"]
    summary = Trainer(model, config, tmp_path, RandomWindows(tokens, 32, 8, seed=0), evaluate).fit()
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < 0.5 * np.mean([losses[s] for s in range(1, 6)])
    assert summary["step"] == 30 and summary["val_loss"] < 0.5 * before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_kill_equals_uninterrupted(shards, tmp_path, train_tiny, precision: str) -> None:
    """A run SIGKILLed after a checkpoint, then resumed in another process, equals a run never stopped.

    The killed run is a child process; the resumed and the uninterrupted runs run in this process,
    with the same single thread as the child."""
    options = dict(max_steps=10, precision=precision, dropout=0.1, eval_interval=3, log_interval=1)
    full, killed = tmp_path / "full", tmp_path / "killed"
    log = tmp_path / "killed.log"
    victim = start(argv(shards, killed, step_sleep=0.2, **options), log)
    try:
        deadline = time.monotonic() + 90
        while True:  # kill once a checkpoint exists and a later step has been trained
            assert victim.poll() is None, "the run ended before it was killed:\n" + log.read_text()[-4000:]
            saved = checkpoint_step(killed)
            trained = max(train_losses(killed), default=0)
            if saved is not None and saved >= 3 and trained > saved:
                break
            assert time.monotonic() < deadline, "the run never reached a checkpoint:\n" + log.read_text()[-4000:]
            time.sleep(0.02)
    finally:
        stop(victim)
    assert victim.returncode == -signal.SIGKILL
    resumed_from = torch.load(killed / "checkpoint" / "trainer_state.pt", weights_only=True)["step"]
    lost = [s for s in train_losses(killed) if s > resumed_from]
    assert 3 <= resumed_from < 10 and lost, "the kill must fall after a checkpoint and before the end"

    assert train_tiny.main(argv(shards, killed, resume=True, **options))["step"] == 10
    train_tiny.main(argv(shards, full, **options))
    assert_same_run(full, killed, 10)


def test_ddp_two_processes_equal_one(shards, tmp_path, train_tiny) -> None:
    options = dict(max_steps=5, batch_size=4, precision="fp32", eval_interval=100, log_interval=1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = start(argv(shards, tmp_path / "ddp", **options), tmp_path / "ddp.log", launcher=torchrun)
    try:
        train_tiny.main(argv(shards, tmp_path / "one", **options))  # one process, meanwhile, in this one
        ddp.wait(timeout=120)
    finally:
        stop(ddp)
    log = (tmp_path / "ddp.log").read_text()
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "ddp")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5], log[-4000:]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    a, b = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=WEIGHTS_ATOL, rtol=0, msg=name)
    assert ddp.returncode == 0, "torchrun failed:\n" + log[-4000:]


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_grad_accum_equals_one_big_batch(shards, tmp_path, train_tiny, grad_accum: int) -> None:
    options = dict(max_steps=5, batch_size=4, precision="fp32", eval_interval=5, log_interval=1)
    train_tiny.main(argv(shards, tmp_path / "one", grad_accum=1, **options))
    train_tiny.main(argv(shards, tmp_path / "acc", grad_accum=grad_accum, **options))
    one, acc = train_losses(tmp_path / "one"), train_losses(tmp_path / "acc")
    assert sorted(one) == sorted(acc) == [1, 2, 3, 4, 5]
    for step in one:
        assert acc[step] == pytest.approx(one[step], rel=1e-5), step
    a, b = weights(tmp_path / "one"), weights(tmp_path / "acc")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=WEIGHTS_ATOL, rtol=0, msg=name)


def test_run_directory_and_checkpoint(shards, tmp_path, train_tiny) -> None:
    run = tmp_path / "run"
    trainer = train_tiny.build(argv(shards, run, max_steps=4, eval_interval=2, style="llama"))
    summary = trainer.fit()
    assert summary["step"] == 4 and "val_loss" in summary

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if "loss" in r)

    checkpoint = run / "checkpoint"
    names = {p.name for p in checkpoint.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "lmforge.json", "trainer_state.pt"}
    assert {p.name for p in run.iterdir()} >= {"checkpoint", "metrics.jsonl"}
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary directories left

    info = read_info(run)
    assert info["step"] == 4 and info["precision"] == "fp32" and info["val_loss"] == summary["val_loss"]
    assert info["train"]["max_steps"] == 4 and info["versions"]["torch"] == torch.__version__
    assert info["data"] == json.loads((shards / "meta.json").read_text())["fingerprint"]
    # every field, the default head width (d_model / n_head) written as null so that it follows them
    assert json.loads((checkpoint / "config.json").read_text()) == {**vars(trainer.model.config), "head_dim": None}
    assert Tokenizer.load(checkpoint).to_json() == trainer.tokenizer.to_json()

    loaded = load_checkpoint(run)  # a run directory resolves to its checkpoint
    assert loaded.tokenizer is not None and loaded.config == trainer.model.config
    ids = torch.tensor([trainer.tokenizer.encode("Shall I compare thee to a summer's day?")])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), trainer.model(ids))
    assert loaded.generate("Shall I", max_new_tokens=5, temperature=0) == trainer.model.generate(
        "Shall I", max_new_tokens=5, temperature=0, tokenizer=trainer.tokenizer)


def test_checkpoint_files_are_readable_like_other_outputs(shards, tmp_path, train_tiny) -> None:
    """The checkpoint honours the umask like prepared data and tokenizer.json do (not owner-only)."""
    run = tmp_path / "run"
    train_tiny.main(argv(shards, run, max_steps=1))
    umask = os.umask(0)
    os.umask(umask)
    checkpoint = run / "checkpoint"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o777 & ~umask
    for path in checkpoint.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


class FailingTokenizer:
    """A tokenizer whose save dies halfway through writing (a full disk, say)."""

    def save(self, path):
        Path(path).write_text('{"version": "1.0", "trunc')
        raise OSError(28, "No space left on device")


def test_crash_while_saving_keeps_the_previous_checkpoint(shards, tmp_path, train_tiny) -> None:
    run = tmp_path / "run"
    trainer = train_tiny.build(argv(shards, run, max_steps=3, eval_interval=3))
    trainer.fit()
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}

    trainer.tokenizer = FailingTokenizer()
    trainer.config.max_steps = 6
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    assert trainer.step == 6
    assert {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "metrics.jsonl"]  # no temporary litter
    # and the surviving checkpoint resumes
    resumed = train_tiny.build(argv(shards, run, max_steps=6, eval_interval=3))
    assert resumed.fit(resume=True)["step"] == 6
    assert checkpoint_step(run) == 6


def test_a_crash_between_the_two_renames_of_a_save_resumes_from_the_previous_checkpoint(
        shards, tmp_path, train_tiny, monkeypatch, capsys) -> None:
    """Without RENAME_EXCHANGE a save takes two renames; a crash between them leaves no `checkpoint/`,
    only `checkpoint.prev/`: resuming from there says so and ends as the run that never crashed."""
    import lmforge.files

    run = tmp_path / "run"
    options = dict(max_steps=6, eval_interval=2)
    monkeypatch.setattr(lmforge.files, "_exchange", lambda a, b: False)
    rename, crashes = os.replace, []

    def rename_and_copy_the_run(a, b) -> None:
        rename(a, b)
        if Path(a) == run / "checkpoint":  # the first of the two renames: the disk as a crash would leave it
            crashes.append(tmp_path / f"crash-{len(crashes)}")
            shutil.copytree(run, crashes[-1])

    monkeypatch.setattr(os, "replace", rename_and_copy_the_run)
    train_tiny.main(argv(shards, run, **options))
    monkeypatch.setattr(os, "replace", rename)
    assert len(crashes) == 2  # the saves at steps 4 and 6 replaced a checkpoint
    for crash, step in zip(crashes, (2, 4)):
        assert not (crash / "checkpoint").exists() and read_info(crash / "checkpoint.prev")["step"] == step
        capsys.readouterr()
        assert train_tiny.main(argv(shards, crash, resume=True, **options))["step"] == 6
        said = capsys.readouterr().out
        assert f"{crash / 'checkpoint'} is missing; resuming from {crash / 'checkpoint.prev'} (step {step})" in said
        assert_same_run(run, crash, 6)
        assert sorted(p.name for p in crash.iterdir()) == ["checkpoint", "checkpoint.prev", "metrics.jsonl"]


def test_resume_skips_a_damaged_newest_checkpoint(shards, tmp_path, train_tiny, capsys) -> None:
    run, full = tmp_path / "run", tmp_path / "full"
    options = dict(max_steps=6, eval_interval=3)
    train_tiny.main(argv(shards, full, **options))
    shutil.copytree(full, run)
    assert read_info(run / "checkpoint.prev")["step"] == 3  # the checkpoint before the last is kept
    weights_file = run / "checkpoint" / "model.safetensors"
    os.truncate(weights_file, weights_file.stat().st_size // 2)
    with pytest.raises(UserError, match="damaged checkpoint"):
        load_checkpoint(run)
    capsys.readouterr()
    assert train_tiny.main(argv(shards, run, resume=True, **options))["step"] == 6
    said = [line for line in capsys.readouterr().out.splitlines() if "resuming" in line]
    assert len(said) == 1 and said[0].startswith(f"damaged checkpoint: {weights_file} has "), said
    assert said[0].endswith(f"checkpoint/ moved to checkpoint.damaged/; resuming from {run / 'checkpoint.prev'} "
                            f"(step 3) instead")
    assert_same_run(full, run, 6)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "checkpoint.damaged", "checkpoint.prev",
                                                     "metrics.jsonl"]


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(
        shards, tmp_path, train_tiny) -> None:
    """SIGTERM in the middle of a run (not at an evaluation): the step finishes, a checkpoint is saved,
    one line says so and the process exits with 128 + 15, without a traceback; resuming ends as a run
    never stopped (the training loss since the last evaluation travels in the checkpoint)."""
    options = dict(max_steps=10, eval_interval=4, dropout=0.1, log_interval=1)
    stopped, full, log = tmp_path / "stopped", tmp_path / "full", tmp_path / "stopped.log"
    process = start(argv(shards, stopped, step_sleep=0.3, **options), log, script=CLI_SCRIPT)
    try:
        deadline = time.monotonic() + 90
        while max(train_losses(stopped), default=0) < 5:  # past the checkpoint of step 4
            assert process.poll() is None, "the run ended before the signal:\n" + log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached step 5:\n" + log.read_text()[-4000:]
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        stop(process)
    output = log.read_text()
    assert process.returncode == 128 + signal.SIGTERM, output[-4000:]
    assert "Traceback" not in output
    step = max(train_losses(stopped))
    assert 5 <= step < 10
    assert (f"stopped by SIGTERM at step {step} of 10; checkpoint saved in {stopped / 'checkpoint'}; "
            f"run the same command with --resume to continue") in output
    assert checkpoint_step(stopped) == step
    assert torch.load(stopped / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == step

    assert train_tiny.main(argv(shards, stopped, resume=True, **options))["step"] == 10
    train_tiny.main(argv(shards, full, **options))
    assert_same_run(full, stopped, 10)


def signal_at(trainer, step: int, *signums: int) -> None:
    """Make `trainer` send itself `signums` while it makes the batch of `step`."""
    batches = trainer.batches

    def batches_then_signal(at: int, part: int, rows: int):
        if at == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return batches(at, part, rows)

    trainer.batches = batches_then_signal


def test_a_signal_stops_fit_after_its_step_and_the_handlers_come_back(shards, tmp_path, train_tiny, capsys) -> None:
    run = tmp_path / "run"
    trainer = train_tiny.build(argv(shards, run, max_steps=10, eval_interval=5))
    signal_at(trainer, 2, signal.SIGINT)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        trainer.fit()
    assert caught.value.signum == signal.SIGINT and trainer.step == 3 and checkpoint_step(run) == 3
    assert not isinstance(caught.value, UserError)
    assert str(caught.value) in capsys.readouterr().err  # said once, on stderr
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    twice = train_tiny.build(argv(shards, tmp_path / "twice", max_steps=10, eval_interval=5))
    signal_at(twice, 1, signal.SIGINT, signal.SIGINT)  # Ctrl-C twice: stop at once, without a checkpoint
    with pytest.raises(KeyboardInterrupt):
        twice.fit()
    assert checkpoint_step(tmp_path / "twice") is None
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_resume_tolerates_a_torn_metrics_line(shards, tmp_path, train_tiny) -> None:
    """A kill in the middle of writing metrics.jsonl leaves half a line; resuming must not choke on it."""
    run = tmp_path / "run"
    train_tiny.main(argv(shards, run, max_steps=3, eval_interval=3))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.81')
    summary = train_tiny.main(argv(shards, run, max_steps=5, eval_interval=3, resume=True))
    assert summary["step"] == 5
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5]


def test_resuming_a_finished_run_changes_nothing(shards, tmp_path, train_tiny) -> None:
    run = tmp_path / "run"
    train_tiny.main(argv(shards, run, max_steps=3, eval_interval=3))
    records, before = read_metrics(run), weights(run)
    summary = train_tiny.main(argv(shards, run, max_steps=3, eval_interval=3, resume=True))
    assert summary["step"] == 3
    assert [r for r in read_metrics(run) if "loss" in r] == [r for r in records if "loss" in r]
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_time_budget_stops_and_saves(shards, tmp_path, train_tiny) -> None:
    run = tmp_path / "run"
    trainer = train_tiny.build(argv(shards, run, max_steps=1000, eval_interval=500))
    trainer.config.max_minutes = 1e-9  # out of time after the first step
    summary = trainer.fit()
    assert summary["step"] == 1 and checkpoint_step(run) == 1
    resumed = train_tiny.build(argv(shards, run, max_steps=3, eval_interval=500))
    assert resumed.fit(resume=True)["step"] == 3


def test_fp16_autocast_trains(shards, tmp_path, train_tiny) -> None:
    run = tmp_path / "run"
    train_tiny.main(argv(shards, run, max_steps=3, precision="fp16"))
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    assert read_info(run)["precision"] == "fp16"
    assert all(torch.isfinite(w).all() and w.dtype == torch.float32 for w in weights(run).values())


@pytest.fixture(scope="module")
def small_checkpoint(shards, tmp_path_factory, train_tiny) -> Path:
    run = tmp_path_factory.mktemp("small") / "run"
    train_tiny.main(argv(shards, run, max_steps=1))
    return run / "checkpoint"


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


BROKEN_CHECKPOINTS = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "config.json"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    "unknown kind": (lambda d: edit_config(d, kind="encoder"), "not supported"),
    "unknown key": (lambda d: edit_config(d, n_layers=2), "n_layers"),
    "more layers than weights": (lambda d: edit_config(d, n_layer=3), "does not match"),
    "weights of other sizes": (lambda d: edit_config(d, d_ff=256), "does not match"),
}


@pytest.mark.parametrize("case", BROKEN_CHECKPOINTS)
def test_broken_checkpoints_are_user_errors(small_checkpoint, tmp_path, case: str) -> None:
    """What a checkpoint's files say is checked too: here without lmforge.json's record of the files
    (which would refuse any edit; see test_checkpoint.py), as in checkpoints written before it."""
    load_checkpoint(small_checkpoint)  # the original is fine
    broken = tmp_path / "checkpoint"
    shutil.copytree(small_checkpoint, broken)
    info = json.loads((broken / "lmforge.json").read_text())
    (broken / "lmforge.json").write_text(json.dumps({k: v for k, v in info.items() if k != "files"}))
    damage, message = BROKEN_CHECKPOINTS[case]
    damage(broken)
    with pytest.raises(UserError, match=message):
        load_checkpoint(broken)


def test_checkpoint_lookup_errors(small_checkpoint, tmp_path) -> None:
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not an lmforge checkpoint"):
        load_checkpoint(tmp_path)
    # a tokenizer with more tokens than the model has embeddings does not belong to it
    config = load_checkpoint(small_checkpoint).config
    small = Decoder(type(config)(**{**vars(config), "vocab_size": 100}))
    save_checkpoint(tmp_path / "small-vocab", small, Tokenizer.load(small_checkpoint))
    with pytest.raises(UserError, match="does not belong"):
        load_checkpoint(tmp_path / "small-vocab")


def test_resume_without_a_checkpoint_is_a_user_error(shards, tmp_path, train_tiny) -> None:
    trainer = train_tiny.build(argv(shards, tmp_path / "fresh", max_steps=2))
    with pytest.raises(UserError, match="no resumable checkpoint"):
        trainer.fit(resume=True)
    # a checkpoint without trainer state (an exported model) cannot be resumed either
    run = tmp_path / "run"
    train_tiny.main(argv(shards, run, max_steps=1))
    (run / "checkpoint" / "trainer_state.pt").unlink()
    with pytest.raises(UserError, match="trainer_state.pt"):
        train_tiny.build(argv(shards, run, max_steps=2)).fit(resume=True)


def test_batch_that_does_not_split_over_accumulation_is_a_user_error(shards, tmp_path, train_tiny) -> None:
    with pytest.raises(UserError, match="batch_size"):
        train_tiny.build(argv(shards, tmp_path / "x", batch_size=6, grad_accum=4))


def test_activation_checkpointing_gives_the_same_training(tokenizer, make_config, tmp_path) -> None:
    """Recomputing the blocks in the backward pass changes memory, not results (dropout included)."""
    tokens = np.array(tokenizer.encode("the cat sat on the mat, and the dog sat on the log. " * 40))
    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Decoder(make_config("llama", vocab_size=tokenizer.vocab_size, dropout=0.1))
        config = TrainConfig(batch_size=4, max_steps=5, lr=1e-2, warmup_steps=1, precision="fp32",
                             eval_interval=100, log_interval=1, activation_checkpointing=checkpointing)
        out = tmp_path / str(checkpointing)
        Trainer(model, config, out, RandomWindows(tokens, 32, 4, seed=0)).fit()
        assert model.activation_checkpointing is checkpointing
        losses[checkpointing] = train_losses(out)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    with pytest.raises(UserError, match="does not support it"):
        Trainer(torch.nn.Linear(2, 2), TrainConfig(activation_checkpointing=True), tmp_path / "x", lambda *a: None)
