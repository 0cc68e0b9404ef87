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

from lmforge.config import ElboConfig

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


# ------------------------------------------------------------------------------------------------
# the generated parsers: every verb's help, --print-config / --config, one-line mistakes, the README


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`lmforge ARGS` through `main` in this process: exit code, stdout, stderr."""
    from lmforge.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_verb_has_help_from_its_function(capsys):
    from lmforge.cli import GROUPS, VERBS
    from lmforge.cligen import verb_params

    code, listing, _ = in_process(capsys, "--help")
    assert code == 0
    for name, verb in VERBS.items():
        line = next(line for line in listing.splitlines() if line.startswith(f"  {name} "))
        assert len(line[len(name) + 2:].strip()) > 10, line  # a summary: the docstring's first line
        code, out, err = in_process(capsys, *name.split(), "--help")
        assert code == 0 and out.startswith(f"usage: lmforge {name} "), (name, err)
        if verb.function:  # generated: every parameter is offered, with its docstring's help
            assert "--config FILE" in out and "--print-config" in out
            for p in verb_params(verb, verb.load()):
                assert (p.name.upper() if p.positional else p.flag) in out, (name, p.name)
    for group in GROUPS:
        code, out, _ = in_process(capsys, group, "--help")
        assert code == 0 and all(f"  {name} " in out for name in VERBS if name.split()[0] == group)
    code, out, _ = in_process(capsys, "pretrain", "--help")
    assert "--train.lr VALUE" in out and "peak learning rate" in out and "[--model.FIELD VALUE ...]" in out


def test_help_and_version_import_nothing_heavy(tmp_path):
    script = ("import sys\nfrom lmforge.cli import main\n"
              "assert main(['--help']) == 0 and main(['--version']) == 0 and main(['vae', '--help']) == 0\n"
              "heavy = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]\n"
              "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "verbs:" in r.stdout and "vae sample" in r.stdout
    r = lmforge("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("lmforge ")


@pytest.mark.parametrize("args", [
    ["prepare", "--data", "corpus", "--out", "d", "--no-clean"],
    ["prepare", "--data", "corpus", "--out", "d", "--clean.near_threshold", "0.9", "--clean.normalize", "none"],
    ["generate", "run", "--stop", "a", "--stop", "b b", "--top-k", "5", "--dtype", "bf16"],
    ["classify", "zero-shot", "m", "--labels", "a=b,c=d", "--text", "x", "--template", "Q: {text}\nA:"],
    ["eval", "m", "--task", "lm", "--limit", "3"],
    ["tokenizer", "train", "--data", "c", "--out", "t", "--special-tokens", "<a>", "<b>"],
    ["summarize", "eval", "m", "--beam-size", "2"],
    ["vae", "encode", "run", "--data", "lines.txt", "--out", "z.npy", "--unit", "document"],
], ids=lambda args: " ".join(args[:2]))
def test_print_config_is_read_back_by_config(args, tmp_path, capsys):
    from lmforge.cli import parse_command

    verb = args[:2] if args[0] in ("classify", "tokenizer", "summarize", "vae") else args[:1]
    code, printed, err = in_process(capsys, *args, "--print-config")
    assert code == 0, err
    (tmp_path / "run.yaml").write_text(printed)
    from_file = [*verb, "--config", str(tmp_path / "run.yaml")]
    code, again, err = in_process(capsys, *from_file, "--print-config")
    assert code == 0, err
    assert again == printed
    assert parse_command(from_file).kwargs == parse_command(args).kwargs
    # flags override the file
    if args[0] == "generate":
        assert parse_command([*from_file, "--top-k", "7"]).kwargs["top_k"] == 7
        assert parse_command(args).kwargs["stop"] == ["a", "b b"]
    if "--no-clean" in args:
        assert parse_command(from_file).kwargs["clean"] is False


def toy_recipe(data: str, out: str, preset: str | None = None, data_format: str = "auto",
               elbo: ElboConfig | None = None,
               overrides: dict | None = None, resume: bool = False) -> dict:
    """Train a toy (what a recipe's signature and docstring look like to the generator).

    Args:
        data: the training data
        out: the run directory
        preset: the model preset
        data_format: the shape of the data
        elbo: the VAE objective (None: not a VAE)
        resume: continue the run in out
    """
    return {"data": data, "out": out, "preset": preset, "data_format": data_format, "elbo": elbo,
            "overrides": overrides, "resume": resume}


def test_a_flat_dataclass_parameter_and_an_old_flag_spelling():
    """`vae train --beta-schedule cyclical` (ElboConfig's fields without the `--elbo.` prefix) and
    `finetune --format chat` (an older spelling of --data-format)."""
    from lmforge.cligen import Verb, parse

    verb = Verb("toy", toy_recipe, required=("data", "out"), hide=("overrides",), flat=("elbo",),
                aliases={"--format": "data_format"})
    kwargs = parse(verb, ["--data", "d", "--out", "o", "--beta-schedule", "cyclical", "--elbo.free_bits", "0.1",
                          "--format", "chat"]).kwargs
    assert kwargs["elbo"] == ElboConfig(beta_schedule="cyclical", free_bits=0.1) and kwargs["data_format"] == "chat"
    assert parse(verb, ["--data", "d", "--out", "o"]).kwargs["elbo"] is None


def test_settings_sections_become_flags_config_sections_and_overrides(tmp_path, capsys):
    """`fn.settings = {"model": ModelConfig, "train": TrainConfig}` (the training functions' `@settings`):
    `--model.FIELD` / `--train.FIELD` flags and `model:` / `train:` sections in --config, passed to the
    function as dotted `overrides`; --print-config holds what was given (a preset fills in the rest)."""
    import functools

    from lmforge.cligen import Verb, parse
    from lmforge.config import ModelConfig, TrainConfig, settings

    recipe = settings(model=ModelConfig, train=TrainConfig)(functools.wraps(toy_recipe)(lambda **k: toy_recipe(**k)))
    verb = Verb("toy", recipe, required=("data", "out"), hide=("elbo",))
    args = ["--data", "d", "--out", "o", "--preset", "tiny", "--train.lr", "3e-4", "--model.n_layer", "2", "--resume"]
    call = parse(verb, args)
    assert call() == {"data": "d", "out": "o", "preset": "tiny", "data_format": "auto", "elbo": None, "resume": True,
                      "overrides": {"train.lr": 3e-4, "model.n_layer": 2}}
    with pytest.raises(SystemExit):
        parse(verb, [*args, "--print-config"])
    printed = capsys.readouterr().out
    assert "model:\n  n_layer: 2\ntrain:\n  lr: 0.0003\n" in printed and "overrides" not in printed
    (tmp_path / "toy.yaml").write_text(printed)
    from_file = parse(verb, ["--config", str(tmp_path / "toy.yaml"), "--train.batch_size", "4"])
    assert from_file.kwargs == {**call.kwargs, "overrides": {**call.kwargs["overrides"], "train.batch_size": 4}}
    with pytest.raises(SystemExit):
        parse(verb, ["--help"])
    assert "--train.lr VALUE" in (out := capsys.readouterr().out) and "peak learning rate (default: 0.001)" in out
    (tmp_path / "bad.yaml").write_text("data: d\nout: o\ntrain:\n  learning_rate: 0.1\n")
    for bad, message in ((["--config", str(tmp_path / "bad.yaml")], "train.learning_rate is not a setting"),
                         ([*args, "--train.lr", "fast"], "--train.lr = 'fast'; expected a float")):
        with pytest.raises(SystemExit) as exit:
            parse(verb, bad)
        assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, fragments", [
    (["generate", "run", "--top-k", "five"], ["lmforge generate: error:", "--top-k = 'five'", "int"]),
    (["eval", "m", "--task", "poems"], ["lmforge eval: error:", "expected one of classify, summarize"]),
    (["eval", "m"], ["lmforge eval: error:", "--task", "--harness"]),
    (["augment", "--data", "x.jsonl", "--out", "y.jsonl", "--n-aug", "2.5"], ["--n-aug = 2.5", "int"]),
    (["prepare", "--data", "x", "--out", "y", "--clen.bands", "3"],
     ["unrecognized argument '--clen.bands'", "did you mean --clean.bands"]),
    (["prepare", "--data", "x", "--out", "y", "--clean.bands", "many"], ["--clean.bands = 'many'"]),
    (["classify", "predicts", "run"], ["lmforge classify: error: unknown action 'predicts'"]),
    (["clasify", "predict", "run"], ["lmforge: error: unknown verb 'clasify'", "did you mean 'classify'"]),
    (["--verbose"], ["lmforge: error: unrecognized argument '--verbose'"]),
    (["pretrain", "--data", "d"], ["lmforge pretrain: error:", "required", "--out"]),
    (["pretrain", "--data", "d", "--out", "o", "--train.lr"], ["lmforge pretrain: error:", "--train.lr"]),
    (["generate", "run", "--config", "bad.yaml"], ["bad.yaml: unknown setting 'topk' (did you mean 'top_k'?)"]),
    (["generate", "run", "--config", "missing.yaml"], ["config file not found: missing.yaml"]),
])
def test_a_mistake_on_the_command_line_is_one_line(args, fragments, tmp_path):
    (tmp_path / "bad.yaml").write_text("topk: 3\n")
    assert_user_error(lmforge(*args, cwd=tmp_path), *fragments)


def readme_commands() -> list[list[str]]:
    """The arguments of every `lmforge ...` command in the README's bash blocks (synopsis lines with
    [optional parts] aside); also `torchrun ... -m lmforge ...` and `echo x | lmforge ...`."""
    import re
    import shlex

    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for segment in re.split(r"\s[|;]\s", line):
                words = shlex.split(segment, comments=True)
                starts = [i for i, w in enumerate(words) if w == "lmforge" and (i == 0 or words[i - 1] == "-m")]
                if starts and not any(w.startswith("[") for w in words):
                    commands.append(words[starts[0] + 1:])
    return commands


def test_the_readme_commands_parse(capsys):
    from lmforge.cli import VERBS, parse_command

    commands = readme_commands()
    assert len(commands) >= 30
    verbs = set()
    for args in commands:
        try:
            call = parse_command(args)
        except SystemExit as e:
            pytest.fail(f"lmforge {' '.join(args)}: exit {e.code}: {capsys.readouterr().err.strip()}")
        verbs.add(call.verb.name)
    # every verb the README shows, and (nearly) every verb there is
    assert {"generate", "prepare", "pretrain", "finetune", "chat", "classify zero-shot", "vae interpolate"} <= verbs
    assert len(verbs) >= len(VERBS) - 6, sorted(set(VERBS) - verbs)


def test_a_training_run_stopped_by_sigterm_exits_with_143(workspace, tmp_path):
    """`lmforge.errors.Interrupted` (raised after the Trainer saved its checkpoint) ends the CLI with
    128 + the signal's number and one line on stderr, no traceback."""
    import signal
    import time

    env = {**os.environ, "LMFORGE_CACHE": str(workspace / "cache"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "pretrain", "--data", str(workspace / "data"), "--out", str(run),
         "--preset", "tiny", "--model.block_size", "32", "--train.max_steps", "100000", "--train.log_interval", "1",
         "--train.eval_interval", "100000", "--train.precision", "fp32"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ") and "--resume" in last  # said once, by the Trainer
    assert sum("stopped by SIGTERM" in line for line in err.splitlines() + out.splitlines()) == 1
    assert (run / "checkpoint" / "model.safetensors").is_file()
