"""The `lmforge` command line, run as a user runs it (subprocesses): the whole path and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORDS = ("the king and queen walk in the garden at night while the river sings of old days "
         "and every bird of the forest answers with a song of spring").split()


def corpus_text(seed: int, lines: int = 120) -> str:
    import random

    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + ".\n"
                   for _ in range(lines))


def lmforge(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A corpus of three documents, a tokenizer, shards and a short pretraining run, made with the CLI."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(corpus_text(i))
    r = lmforge("tokenizer", "train", "--data", "corpus", "--out", "tok", "--vocab-size", "320", cwd=root)
    assert r.returncode == 0, r.stderr
    r = lmforge("prepare", "--data", "corpus", "--out", "data", "--tokenizer", "tok", cwd=root)
    assert r.returncode == 0, r.stderr
    r = lmforge("pretrain", "--data", "data", "--out", "run", "--preset", "tiny", "--model.block_size", "32",
                "--train.max_steps", "30", "--train.eval_interval", "10", "--train.eval_batches", "2",
                "--train.warmup_steps", "3", "--train.lr", "3e-3", "--train.precision", "fp32",
                "--train.log_interval", "1",
                cwd=root)
    assert r.returncode == 0, r.stderr
    return root


def test_help_lists_verbs_and_config_flags(tmp_path):
    r = lmforge("--help", cwd=tmp_path)
    for verb in ("demo", "tokenizer", "prepare", "pretrain", "generate", "models"):
        assert verb in r.stdout
    r = lmforge("pretrain", "--help", cwd=tmp_path)
    assert "--train.lr" in r.stdout and "--model.n_layer" in r.stdout and "--resume" in r.stdout


def test_models_lists_presets_with_sizes(tmp_path):
    r = lmforge("models", cwd=tmp_path)
    assert r.returncode == 0
    assert "124,439,808" in r.stdout  # GPT-2 124M
    assert "llama-1b" in r.stdout


def test_pretrain_writes_a_run_that_learned(workspace):
    meta = json.loads((workspace / "data" / "meta.json").read_text())
    assert meta["vocab_size"] <= 320 and meta["dtype"] == "uint16"
    records = [json.loads(line) for line in (workspace / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 30 and len(val) == 3
    assert losses[-1] < losses[0] - 1.0  # a repetitive corpus is easy to learn
    assert val[-1] < val[0]
    checkpoint = workspace / "run" / "checkpoint"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lmforge.json", "trainer_state.pt"):
        assert (checkpoint / name).is_file(), name
    assert (workspace / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((checkpoint / "lmforge.json").read_text())
    assert info["data"]["fingerprint"] == meta["fingerprint"]
    assert info["val_bpb"] > 0


def test_generate_streams_the_same_text_as_the_python_api(workspace):
    r = lmforge("generate", "run", "--prompt", "The king", "--max-new-tokens", "20", "--temperature", "0",
                cwd=workspace)
    assert r.returncode == 0, r.stderr
    import lmforge as lf

    model = lf.load(workspace / "run")
    expected = model.generate("The king", max_new_tokens=20, temperature=0)[0]
    assert r.stdout == "The king" + expected + "\n"
    assert len(expected) > 0
    r = lmforge("generate", "run", "--prompt", "The king", "--max-new-tokens", "20", "--temperature", "0",
                "--dtype", "bf16", cwd=workspace)
    assert r.returncode == 0, r.stderr
    expected = lf.load(workspace / "run", dtype=torch.bfloat16).generate("The king", max_new_tokens=20, temperature=0)
    assert r.stdout == "The king" + expected[0] + "\n"


def test_generate_reads_the_prompt_from_stdin_and_samples_reproducibly(workspace):
    args = ("generate", "run", "--max-new-tokens", "15", "--num-samples", "2", "--seed", "7", "--top-k", "20")
    first = lmforge(*args, cwd=workspace, stdin="The queen")
    second = lmforge(*args, cwd=workspace, stdin="The queen")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.count("--- sample") == 2 and "The queen" in first.stdout


def test_resume_continues_a_finished_run_for_more_steps(workspace, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    r = lmforge("pretrain", "--data", str(workspace / "data"), "--out", str(run), "--resume",
                "--train.max_steps", "35", cwd=workspace)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 36))


def test_demo_on_own_text(tmp_path):
    (tmp_path / "mine.txt").write_text(corpus_text(5, lines=400))
    r = lmforge("demo", "--data", "mine.txt", "--minutes", "0.1", "--preset", "tiny", "--vocab-size", "300",
                "--out", "demo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--- sample 3 ---" in r.stdout and "lmforge generate" in r.stdout
    assert "bits per byte" in r.stderr
    assert (tmp_path / "demo" / "loss.png").is_file()
    assert (tmp_path / "demo" / "checkpoint" / "model.safetensors").is_file()
    # a second demo reuses the cached tokenizer and shards, and never writes over the first run
    r = lmforge("demo", "--data", "mine.txt", "--minutes", "0.05", "--preset", "tiny", "--vocab-size", "300",
                "--out", "demo", cwd=tmp_path)
    assert_user_error(r, "demo", "already exists")


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written over


def test_missing_data_file(tmp_path):
    assert_user_error(lmforge("prepare", "--data", "nope.txt", "--out", "d", cwd=tmp_path), "nope.txt")


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    assert_user_error(lmforge("prepare", "--data", "empty.txt", "--out", "d", cwd=tmp_path), "empty.txt", "empty")


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    r = lmforge("tokenizer", "train", "--data", "latin.txt", "--out", "t", cwd=tmp_path)
    assert_user_error(r, "latin.txt", "UTF-8")


def test_jsonl_line_not_json_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    assert_user_error(lmforge("prepare", "--data", "d.jsonl", "--out", "d", cwd=tmp_path), "d.jsonl", "line 2")


def test_jsonl_line_without_the_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert_user_error(lmforge("prepare", "--data", "d.jsonl", "--out", "d", cwd=tmp_path), "line 2", "text")


def test_csv_without_the_column(tmp_path):
    (tmp_path / "d.csv").write_text("title,body\na,b\n")
    r = lmforge("prepare", "--data", "d.csv", "--out", "d", "--text-field", "content", cwd=tmp_path)
    assert_user_error(r, "d.csv", "content")


def test_unknown_preset(workspace, tmp_path):
    r = lmforge("pretrain", "--data", str(workspace / "data"), "--out", "x", "--preset", "gpt5", cwd=tmp_path)
    assert_user_error(r, "gpt5", "gpt-mini")
    assert not (tmp_path / "x").exists()


def test_config_key_that_does_not_exist(workspace, tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\ntrain:\n  learning_rate: 0.1\n")
    r = lmforge("pretrain", "--data", str(workspace / "data"), "--out", "x", "--config", "run.yaml", cwd=tmp_path)
    assert_user_error(r, "learning_rate")


def test_config_value_of_the_wrong_type(workspace, tmp_path):
    r = lmforge("pretrain", "--data", str(workspace / "data"), "--out", "x", "--preset", "tiny",
                "--train.lr", "fast", cwd=tmp_path)
    assert_user_error(r, "train.lr", "float")
    (tmp_path / "run.yaml").write_text("model:\n  n_layer: two\n")
    r = lmforge("pretrain", "--data", str(workspace / "data"), "--out", "x", "--config", "run.yaml", cwd=tmp_path)
    assert_user_error(r, "model.n_layer", "int")


def test_prompt_longer_than_the_context(workspace):
    r = lmforge("generate", "run", "--prompt", "the king " * 100, cwd=workspace)
    assert_user_error(r, "prompt", "context")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "somedir").mkdir()
    assert_user_error(lmforge("generate", "somedir", "--prompt", "hi", cwd=tmp_path), "not an lmforge checkpoint")


def test_existing_run_is_not_overwritten(workspace):
    before = tree_digest(workspace / "run")
    r = lmforge("pretrain", "--data", "data", "--out", "run", "--preset", "tiny", cwd=workspace)
    assert_user_error(r, "already exists and holds a run", "--resume")
    assert tree_digest(workspace / "run") == before


def test_existing_shards_are_not_overwritten(workspace):
    before = tree_digest(workspace / "data")
    r = lmforge("prepare", "--data", "corpus", "--out", "data", "--tokenizer", "tok", cwd=workspace)
    assert_user_error(r, "--overwrite")
    assert tree_digest(workspace / "data") == before
