"""The lm-evaluation-harness backend (lmforge.eval.harness): the same per-example scores and choices as the
harness's own `hf` backend on the same weights (exported with `lmforge export --format hf`), on a small
local multiple-choice task, a rolling-loglikelihood task and a generation task; and its bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.api import export  # noqa: E402
from lmforge.eval.harness import LMForgeLM, evaluate_harness, score_continuations  # noqa: E402
from lmforge.train.checkpoint import save_checkpoint  # noqa: E402

QUESTIONS = [("Shall I compare thee to a summer's day", 1), ("Rough winds do shake the darling buds", 0),
             ("So long as men can breathe", 1), ("And every fair from fair sometime declines", 0),
             ("Thou art more lovely", 1), ("Nor shall death brag", 0)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer, make_model):
    """A tiny Llama-shaped checkpoint and its Hugging Face export (what the `hf` backend loads)."""
    root = tmp_path_factory.mktemp("harness")
    model = make_model("llama", block_size=64, seed=3)
    save_checkpoint(root / "ckpt", model, tokenizer)
    export(root / "ckpt", root / "hf")
    return root


@pytest.fixture(scope="module")
def tasks(checkpoint):
    """Three tiny local tasks in the harness's YAML: multiple choice, rolling loglikelihood, generation."""
    folder = checkpoint / "tasks"
    folder.mkdir()
    data = folder / "sonnet.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"{{text}}\\nQuestion: true?\\n"
        "Answer:\"\ndoc_to_choice: ['no', 'yes', 'perhaps not']\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "ppl.yaml").write_text(
        "task: tiny_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{text}}'\ndoc_to_target: ' x'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


def _run(model, manager, names):
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, log_samples=True, batch_size=4)


def test_the_lmforge_backend_equals_the_hf_backend_example_by_example(checkpoint, tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=str(tasks))
    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    ours = _run(LMForgeLM(path=str(checkpoint / "ckpt"), batch_size=4), manager, names)
    hf = _run(lm_eval.api.registry.get_model("hf")(pretrained=str(checkpoint / "hf"), batch_size=4,
                                                  dtype="float32", device="cpu"), manager, names)
    for name in names:
        ours_samples, hf_samples = ours["samples"][name], hf["samples"][name]
        assert len(ours_samples) == len(hf_samples) == len(QUESTIONS)
        for a, b in zip(ours_samples, hf_samples):
            if name == "tiny_gen":
                assert a["resps"] == b["resps"]  # the same greedy text
                continue
            ours_scores = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in a["resps"]]
            hf_scores = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in b["resps"]]
            assert ours_scores == pytest.approx(hf_scores, rel=1e-4, abs=1e-4)
        if name == "tiny_mc":
            assert [s["acc"] for s in ours_samples] == [s["acc"] for s in hf_samples]  # the same choices
    assert ours["results"]["tiny_mc"]["acc,none"] == hf["results"]["tiny_mc"]["acc,none"]
    assert ours["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        hf["results"]["tiny_ppl"]["bits_per_byte,none"], rel=1e-5)


def test_shared_contexts_score_as_whole_sequences(make_model):
    """One pass over a shared context for one-token continuations equals running each sequence whole."""
    model = make_model("gpt2", block_size=16, seed=4)
    pairs = [([5, 6, 7], [8]), ([5, 6, 7], [9]), ([1, 2], [3, 4, 5]), ([9] * 20, [1]), ([3], [4])]
    got = score_continuations(model, pairs, batch_size=2)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ids = (context + continuation)[-17:]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0, -len(continuation):]
        expected = logits.gather(1, torch.tensor(continuation)[:, None]).sum()
        assert logprob == pytest.approx(float(expected), abs=1e-5)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(continuation)).all())


def test_batches_hold_rows_of_nearly_the_same_length():
    from lmforge.eval.harness import _similar_lengths

    lengths = [778, 40, 300, 290, 295, 41, 39, 42, 280, 100]
    batches = _similar_lengths(lengths, batch_size=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))  # each row once
    assert batches[0] == [0]  # the long outlier runs alone
    for batch in batches:
        assert len(batch) <= 3 and all(lengths[i] >= 0.9 * lengths[batch[0]] for i in batch)
    assert [len(b) for b in batches] == [1, 3, 1, 1, 3, 1]


def test_lmforge_eval_harness_writes_the_report(checkpoint, tasks):
    out = checkpoint / "report"
    report = evaluate_harness(str(checkpoint / "ckpt"), ["tiny_mc"], out=out, include_path=[tasks], limit=4)
    assert report["results"]["tiny_mc"]["acc,none"] is not None
    assert (out / "harness.json").is_file() and "tiny_mc" in (out / "harness.md").read_text()
    assert len((out / "samples_tiny_mc.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("args, message", [
    (["--harness", "no_such_task"], "unknown harness task"),
    (["--harness", "tiny_mc", "--limit", "0"], "--limit 0"),
    (["--harness", "tiny_mc", "--include-path", "/nonexistent"], "no such directory"),
])
def test_bad_harness_input_is_one_line_exit_2(checkpoint, tasks, args, message, tmp_path):
    extra = ["--include-path", str(tasks)] if "--include-path" not in args else []
    run = subprocess.run([sys.executable, "-m", "lmforge", "eval", str(checkpoint / "ckpt"), *args, *extra,
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


def test_a_classifier_is_refused(checkpoint, tokenizer, make_model):
    from lmforge.errors import UserError
    from lmforge.recipes.classify import Classifier

    backbone = make_model("llama")
    backbone.tokenizer = tokenizer
    with pytest.raises(UserError, match="classifier"):
        LMForgeLM(model=Classifier(backbone, ["a", "b"]))


def test_lm_eval_command_line_finds_the_lmforge_backend(checkpoint, tasks, tmp_path):
    run = subprocess.run(["lm_eval", "--model", "lmforge", "--model_args", f"path={checkpoint / 'ckpt'}",
                          "--tasks", "tiny_mc", "--include_path", str(tasks), "--output_path", str(tmp_path)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tiny_mc" in run.stdout and list(Path(tmp_path).rglob("results_*.json"))
