"""Text-to-text tasks (summarize, translate, labels as words), multi-task training and `lmforge eval`,
on tiny datasets written by the tests and models trained from scratch in seconds."""

import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.tasks import text2text
from lmforge.tasks.evaluate import evaluate, evaluate_lm

ANIMALS = ["cat", "dog", "bird", "fish", "horse", "sheep", "goat", "mouse"]
COLOURS = ["red", "blue", "green", "black", "white", "brown"]


def write_splits(folder, make, sizes=(48, 8, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for split, n in zip(("train", "validation", "test"), sizes):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(make(i)) + "\n")
                i += 1
    return folder


def news(i):
    animal, colour = ANIMALS[i % len(ANIMALS)], COLOURS[i % len(COLOURS)]
    return {"document": f"The {colour} {animal} won the prize. It was a long day in the town. "
                        f"People came from far away to see the {animal}.",
            "summary": f"{colour} {animal} wins prize"}


def label_record(i):
    good = i % 2 == 0
    return {"text": f"the film was {'great fun' if good else 'dull and slow'} number {i}",
            "label": "fresh" if good else "rotten"}


@pytest.fixture(scope="module")
def news_data(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("news") / "news", news)


FAST = {"train.lr": 3e-3, "train.batch_size": 8}


def test_translation_direction_and_bad_task_names():
    assert text2text.get_task("translate", "ja-en").template == "Japanese: {source}\nEnglish:"
    assert text2text.get_task("translate", "ja-en").target_language == "en"
    with pytest.raises(UserError, match="expected en-ja or ja-en"):
        text2text.get_task("translate", "en-fr")
    with pytest.raises(UserError, match="known text tasks: summarize, translate, label"):
        text2text.get_task("poetry")


def test_prompt_records_cut_the_source_never_the_target(tokenizer):
    task = text2text.get_task("summarize")
    pairs = [{"source": "word " * 500, "target": "short summary here"}]
    record = text2text.prompt_records(task, pairs, tokenizer, max_length=64)[0]
    assert record["completion"] == " short summary here"
    total = len(tokenizer.encode(record["prompt"])) + len(tokenizer.encode(record["completion"])) + 1
    assert 50 < total <= 64
    assert record["prompt"].startswith("Article: word") and record["prompt"].endswith("\nOne-sentence summary:")


def test_task_pairs_name_missing_fields(tmp_path):
    folder = write_splits(tmp_path / "d", lambda i: {"text": "x"}, (2, 1, 1))
    with pytest.raises(UserError, match="has no field 'document'"):
        text2text.task_pairs(text2text.get_task("summarize"), folder, "train")


def test_summarize_from_scratch_learns_and_is_scored_against_lead_1(news_data, tmp_path):
    out = tmp_path / "sum"
    summary = text2text.train_text_task("summarize", None, news_data, out=out, preset="tiny", epochs=12,
                                        max_length=128, vocab_size=400, overrides=FAST)
    assert summary["best_val_loss"] < summary["val_loss_before"] - 1.0
    assert json.loads((out / "task.json").read_text())["name"] == "summarize"
    report = text2text.evaluate_text_task("summarize", out, news_data, "test", out=tmp_path / "eval")
    assert report["n"] == 8 and [r["system"] for r in report["rows"]] == [str(out), "lead-1 baseline"]
    lead = report["rows"][1]
    assert 0 < lead["rouge1"] < 100  # "The red cat won the prize." shares words with "red cat wins prize"
    saved = json.loads((tmp_path / "eval" / "summarize.json").read_text())
    assert saved["rows"] == report["rows"]
    assert len((tmp_path / "eval" / "summarize_predictions.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "eval" / "summarize_lengths.png").read_bytes()[:4] == b"\x89PNG"
    # the trained model learned the pattern: far better ROUGE-2 than nothing
    assert report["rows"][0]["rouge1"] > 30


def test_cli_summarize_train_predict_eval(news_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["summarize", "train", "--preset", "tiny", str(news_data), "--out", str(out), "--epochs", "2",
                 "--max-length", "128", "--vocab-size", "400", "--train.lr", "3e-3"]) == 0
    assert (out / "best").is_dir() and (out / "loss.png").is_file()
    assert main(["summarize", "predict", str(out), "--text", news(3)["document"]]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1]) > 0
    assert main(["eval", str(out), "--task", "summarize", "--data", str(news_data), "--out",
                 str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "summarize.md").read_text().count("|") > 8
    capsys.readouterr()
    assert main(["eval", str(out), "--task", "poems", "--data", str(news_data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--task = 'poems'; expected one of classify, summarize" in err[0]
    assert main(["summarize", "train", "--preset", "tiny", str(news_data), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_multitask_mixture_and_per_task_scores(news_data, tmp_path):
    labels = write_splits(tmp_path / "labels", label_record)
    with pytest.raises(UserError, match="expected TASK:DATA"):
        text2text.parse_mixture(["summarize"])
    with pytest.raises(UserError, match="positive number"):
        text2text.parse_mixture([f"label:{labels}:0"])
    base = tmp_path / "base"
    text2text.train_text_task("label", None, labels, out=base, preset="tiny", epochs=1, max_length=128, vocab_size=400)
    result = text2text.train_multitask(base, [f"summarize:{news_data}:3", f"label:{labels}:1"], tmp_path / "mt",
                                       method="full", epochs=2, max_length=128, eval_limit=4, overrides=FAST)
    tasks = {row["task"]: row for row in result["tasks"]}
    shares = tasks["summarize"]["examples_per_epoch"], tasks["label"]["examples_per_epoch"]
    assert abs(shares[0] - 3 * shares[1]) <= 3  # weights 3 : 1 (of what cleaning kept)
    assert "rouge1" in tasks["summarize"] and "accuracy" in tasks["label"]
    assert (tmp_path / "mt" / "multitask.md").is_file()


def test_lm_perplexity_equals_the_models_own_loss(tmp_path, tokenizer):
    from lmforge.models.decoder import Decoder
    from lmforge.train.checkpoint import save_checkpoint
    from tests.conftest import SONNET, tiny_config

    torch.manual_seed(0)
    model = Decoder(tiny_config(block_size=512))
    save_checkpoint(tmp_path / "m", model, tokenizer, {})
    data = tmp_path / "text"
    data.mkdir()
    (data / "test.jsonl").write_text(json.dumps({"text": SONNET}) + "\n")
    report = evaluate_lm(tmp_path / "m", data, "test")
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(SONNET)]])
    with torch.no_grad():
        loss = model(ids[:, :-1], targets=ids[:, 1:]).item()
    row = report["rows"][0]
    assert row["loss"] == pytest.approx(loss, abs=1e-4)
    assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-3)
    n_bytes = len(SONNET.encode())
    assert row["bits_per_byte"] == pytest.approx(loss * (ids.shape[1] - 1) / (n_bytes * math.log(2)), rel=1e-3)
    with pytest.raises(UserError, match="unknown task"):
        evaluate(tmp_path / "m", "poems")


@pytest.mark.parametrize("kind", ["seq2seq", "cvae"])
def test_encoder_decoder_kinds_through_the_task_verbs(news_data, tmp_path, capsys, kind):
    out = tmp_path / kind
    assert main(["summarize", "train", "--preset", "tiny", str(news_data), "--out", str(out), "--model-kind", kind,
                 "--epochs", "2", "--max-length", "128", "--vocab-size", "400"]) == 0
    from lmforge.api import load

    assert load(out).config.kind == kind
    assert main(["summarize", "eval", str(out), str(news_data), "--out", str(tmp_path / "e"), "--beam-size", "2"]) == 0
    saved = json.loads((tmp_path / "e" / "summarize.json").read_text())
    assert saved["n"] == 8 and saved["rows"][1]["system"] == "lead-1 baseline"
    capsys.readouterr()
    assert main(["summarize", "train", "smollm2-135m-instruct", str(news_data), "--out", str(tmp_path / "x"),
                 "--model-kind", kind]) == 2
    assert "trains from scratch" in capsys.readouterr().err


def test_task_training_data_is_cleaned_and_checked_for_leakage(tmp_path, capsys):
    folder = write_splits(tmp_path / "d", news, (24, 4, 4))  # news(i) repeats every 24: validation = train[:4]
    train = (folder / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(train + [train[5]]) + "\n")  # and one duplicate in training
    summary = text2text.train_text_task("summarize", None, folder, out=tmp_path / "run", preset="tiny", epochs=1,
                                        max_length=128, vocab_size=400, overrides=FAST)
    quality = summary["quality"]
    assert quality["records_in"] == 25 and quality["removed"]["exact_duplicate"] == 1
    assert quality["removed"]["near_duplicate"] > 0  # the articles differ only in an animal and a colour
    assert summary["train_pairs"] == quality["records_out"] and quality["leakage"]["exact"] == 4
    assert f"cleaned 25 records -> {quality['records_out']}" in capsys.readouterr().err
