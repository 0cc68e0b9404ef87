"""Classification: the head pools the last real token, trains (full and LoRA) with the one Trainer,
saves and loads back with its labels, zero-shot scores label words as the LM does, the TF-IDF
baseline, the CLI verbs end to end, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer import pad_right
from lmforge.models.decoder import Decoder
from lmforge.recipes.classify import Classifier, read_labelled, train_classifier
from lmforge.recipes.finetune import LORA_TARGETS, apply_lora
from lmforge.tasks.classify import (
    label_word_scores,
    load_classifier,
    predict,
    tfidf_baseline,
    zero_shot,
)
from lmforge.train.checkpoint import read_model_config, save_checkpoint

GOOD = "summer lovely fair eternal gold".split()
BAD = "death rough shade winds hot".split()
FILLER = "the and of thy to so long".split()


def reviews(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Separable toy reviews: three words of one class's list among filler words; labels alternate."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        good = i % 2 == 0
        words = rng.sample(GOOD if good else BAD, 3) + rng.sample(FILLER, rng.randint(1, 4))
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": "good" if good else "bad"})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer, make_model) -> Path:
    """A tiny Llama-style decoder checkpoint (random weights) with a real BPE tokenizer."""
    path = tmp_path_factory.mktemp("classify") / "base"
    save_checkpoint(path, make_model("llama", seed=0), tokenizer)
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m lmforge ARGS` in a fresh process (exit codes and stderr exactly as a user sees them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def cli(capsys, cwd: Path, *args: str) -> tuple[int, str, str]:
    """`lmforge ARGS` in this process (no second torch import): exit code, stdout, stderr."""
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pooling_reads_the_last_real_token_so_padding_changes_nothing(make_model, tokenizer):
    torch.manual_seed(0)
    classifier = Classifier(make_model("llama"), ["a", "b", "c"]).eval()
    classifier.backbone.tokenizer = tokenizer
    short, long = tokenizer.encode("Shall I compare thee"), tokenizer.encode("Rough winds do shake the darling buds")
    with torch.no_grad():
        ids, mask = pad_right([short], pad_id=0)
        alone = classifier(ids, mask.sum(1))
        for pad_id in (0, 5):
            ids, mask = pad_right([short, long], pad_id)
            lengths = mask.sum(1)
            assert ids.shape[1] > len(short) and lengths.tolist() == [len(short), len(long)]
            batched = classifier(ids, lengths)
            torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-5)
        # and it is the head applied to the hidden state of that last token, not of padding or the mean
        hidden = classifier.backbone.hidden_states(torch.tensor([short]))
        torch.testing.assert_close(alone[0], classifier.head(hidden[0, -1]), rtol=0, atol=1e-6)
        assert not torch.allclose(batched[0], classifier.head(classifier.backbone.hidden_states(ids)[0, -1]))


def test_full_training_raises_accuracy_and_keeps_the_best(base, tmp_path, capsys):
    records = reviews(200)
    summary = train_classifier(base, records[:160], tmp_path / "run", method="full", epochs=4, val_data=records[160:],
                               overrides={"train.lr": 3e-3})
    assert summary["val_accuracy_before"] < 0.75
    assert summary["val_accuracy"] >= 0.95
    assert summary["best_val_loss"] < 0.3
    epochs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch")]
    assert len(epochs) == 4 and all("val accuracy" in line for line in epochs)
    best = tmp_path / "run" / "best"
    assert json.loads((best / "classifier.json").read_text())["labels"] == ["bad", "good"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    predictions = predict(tmp_path / "run", [r["text"] for r in records[160:]])
    assert sum(p["label"] == r["label"] for p, r in zip(predictions, records[160:])) >= 38
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)


def test_save_and_load_give_identical_probabilities(make_model, tokenizer, tmp_path):
    texts = [r["text"] for r in reviews(12)] + ["Shall I compare thee to a summer's day?"]
    for method in ("full", "lora"):
        torch.manual_seed(1)
        backbone = make_model("llama", seed=1)
        backbone.tokenizer = tokenizer
        if method == "lora":
            backbone = apply_lora(backbone, rank=4, alpha=8, dropout=0.0)
            with torch.no_grad():  # adapters start as a no-op: make them count
                for name, p in backbone.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.5)
        classifier = Classifier(backbone, ["zeta", "alpha", "mid"], max_length=20)
        with torch.no_grad():
            classifier.head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        before = classifier.probabilities(texts)
        save_checkpoint(tmp_path / method, classifier, tokenizer, {"base": str(tmp_path / "base")})
        if method == "full":
            save_checkpoint(tmp_path / "base", make_model("llama", seed=1), tokenizer)
        files = {p.name for p in (tmp_path / method).iterdir()}
        assert {"classifier.json", "classifier.safetensors"} <= files
        assert ("adapter_model.safetensors" in files) == (method == "lora")
        loaded = load_classifier(tmp_path / method)
        assert loaded.labels == ["zeta", "alpha", "mid"] and loaded.max_length == 20
        torch.testing.assert_close(loaded.probabilities(texts), before, rtol=0, atol=1e-5)


def test_lora_trains_only_adapters_and_head(base, tmp_path):
    records = reviews(200, seed=1)
    out = tmp_path / "lora"
    summary = train_classifier(base, records[:160], out, method="lora", epochs=4, val_data=records[160:],
                               lora_rank=4, overrides={"train.lr": 1e-2})
    # what LoRA adds, counted by hand: rank x (in + out) for each adapted linear layer, plus the head
    base_model = Decoder(read_model_config(base))
    adapted = [m for name, m in base_model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS["decoder"]]
    assert adapted
    head = 2 * base_model.config.d_model + 2
    expected = sum(4 * (m.in_features + m.out_features) for m in adapted) + head
    assert summary["trainable_parameters"] == expected
    assert summary["val_accuracy"] >= 0.9 > summary["val_accuracy_before"]
    best = out / "best"
    assert (best / "adapter_model.safetensors").is_file() and not (best / "model.safetensors").exists()
    from safetensors.torch import load_file

    assert all("lora_" in key for key in load_file(best / "adapter_model.safetensors"))
    # the frozen base is untouched: the loaded classifier's backbone is base + adapters, not new weights
    base_weights = load_file(base / "model.safetensors")
    loaded = load_classifier(out)
    assert torch.equal(loaded.backbone.tok_emb.weight, base_weights["tok_emb.weight"])
    assert not torch.equal(loaded.backbone.blocks[0].attn.qkv.weight, base_weights["blocks.0.attn.qkv.weight"])


def test_zero_shot_picks_the_label_whose_words_the_lm_prefers(make_model, tokenizer):
    model = make_model("llama", seed=3, block_size=64)
    model.tokenizer = tokenizer
    words = {"good": "summer's day", "bad": "death", "odd": "eternal lines"}  # one- and multi-token words
    texts = ["Shall I compare thee", "Rough winds do shake the darling buds of May, and", "So long"]
    template = "{text} ({choices}):"
    scores = label_word_scores(model, texts, words, template, batch_size=2)
    # the reference: one unpadded forward per (text, label), summing log p(word token | everything before)
    for i, text in enumerate(texts):
        prompt = tokenizer.encode(template.replace("{choices}", ", ".join(words.values())).replace("{text}", text))
        for j, word in enumerate(words.values()):
            word_ids = tokenizer.encode(" " + word)
            ids = torch.tensor([prompt + word_ids])
            with torch.no_grad():
                log_probs = model(ids)[0].log_softmax(-1)
            expected = sum(log_probs[len(prompt) - 1 + k, t].item() for k, t in enumerate(word_ids))
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)
    predictions = zero_shot(model, texts, words, template, batch_size=2)
    for i, p in enumerate(predictions):
        assert p["label"] == list(words)[int(scores[i].argmax())]
        expected = scores[i].softmax(-1)
        assert [p["probabilities"][label] for label in words] == pytest.approx(expected.tolist(), abs=1e-5)


def test_tfidf_baseline_learns_separable_words():
    records = reviews(120, seed=2)
    train, test = records[:80], records[80:]
    predictions = tfidf_baseline([r["text"] for r in train], [r["label"] for r in train], [r["text"] for r in test])
    assert all(p["label"] == r["label"] for p, r in zip(predictions, test))
    assert all(set(p["probabilities"]) == {"bad", "good"} for p in predictions)
    with pytest.raises(UserError, match="single class"):
        tfidf_baseline(["a b", "c d"], ["x", "x"], ["a"])


def test_cli_train_predict_eval_and_zero_shot(base, tmp_path, capsys):
    records = reviews(160, seed=4)
    train = write_jsonl(tmp_path / "train.jsonl", records[:120])
    test = tmp_path / "test.csv"
    with open(test, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["review", "sentiment"])
        writer.writeheader()
        writer.writerows({"review": r["text"], "sentiment": r["label"]} for r in records[120:])
    code, out, err = cli(capsys, tmp_path, "classify", "train", str(base), str(train), "--out", "run",
                         "--method", "full", "--epochs", "3", "--train.lr", "3e-3")
    assert code == 0, err
    assert "validation accuracy" in out and (tmp_path / "run" / "best" / "classifier.json").is_file()

    code, out, err = cli(capsys, tmp_path, "classify", "predict", "run", "--text", records[120]["text"],
                         "--text", records[121]["text"])
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["label"] for line in lines] == [records[120]["label"], records[121]["label"]]
    assert set(lines[0]["probabilities"]) == {"bad", "good"}
    code, out, err = cli(capsys, tmp_path, "classify", "predict", "run", "--data", "test.csv", "--text-field", "review")
    assert code == 0, err
    assert len(out.splitlines()) == 40

    code, out, err = cli(capsys, tmp_path, "classify", "eval", "run", "test.csv", "--out", "eval",
                         "--text-field", "review", "--label-field", "sentiment",
                         "--zero-shot", str(base), "--label-words", "good=summer,bad=death")
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "classify.json").read_text())
    systems = report["systems"]
    assert len(systems) == 3 and report["n"] == 40
    baseline = systems["TF-IDF + logistic regression"]  # trained on the classifier's own training file
    assert baseline["accuracy"] == 1.0
    classifier = next(v for k, v in systems.items() if k.startswith("lmforge classifier"))
    assert classifier["accuracy"] >= 0.9 and set(classifier["per_class"]) == {"bad", "good"}
    assert all((tmp_path / v["confusion_png"]).stat().st_size > 0 for v in systems.values())
    assert "TF-IDF" in (tmp_path / "eval" / "classify.md").read_text() and "TF-IDF" in out

    code, out, err = cli(capsys, tmp_path, "classify", "eval", "run", "test.csv", "--out", "eval",
                         "--text-field", "review", "--label-field", "sentiment")
    assert code == 2 and "already exists" in err  # nothing written over

    code, out, err = cli(capsys, tmp_path, "classify", "zero-shot", str(base), "--labels", "good=summer,bad=death",
                         "--text", "So long")
    assert code == 0, err
    assert json.loads(out)["label"] in ("good", "bad")
    write_jsonl(tmp_path / "test.jsonl", records[120:])
    code, out, err = cli(capsys, tmp_path, "classify", "zero-shot", str(base), "test.jsonl", "--labels",
                         "good=summer,bad=death", "--train-data", "train.jsonl", "--out", "zs")
    assert code == 0, err
    assert len(json.loads((tmp_path / "zs" / "classify.json").read_text())["systems"]) == 2


def test_bad_input_is_one_line_and_exit_code_2(base, tmp_path, capsys):
    records = reviews(20)
    write_jsonl(tmp_path / "nolabel.jsonl", [{"text": r["text"]} for r in records])
    write_jsonl(tmp_path / "one.jsonl", [{**r, "label": "good"} for r in records])
    write_jsonl(tmp_path / "empty.jsonl", records[:3] + [{"text": "  ", "label": "bad"}])
    # as a user sees it: a fresh process, one line on stderr, exit code 2, no traceback
    done = run_cli("classify", "train", str(base), "nolabel.jsonl", "--out", "a", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("lmforge classify: error: nolabel.jsonl record 1: no field 'label' (fields: text); "
                                   "pass --text-field / --label-field")
    cases = [
        (["train", str(base), "one.jsonl", "--out", "b"], "at least 2 classes"),
        (["train", str(base), "empty.jsonl", "--out", "c"], "empty.jsonl record 4: empty text"),
        (["predict", str(base), "--text", "so long"], "is not a classifier"),
        (["zero-shot", str(base), "--labels", "good", "--text", "so long"], "LABEL=WORD"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, tmp_path, "classify", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / args[-1]).exists()
    # a label the classifier does not know, in evaluation data
    out = tmp_path / "run"
    train_classifier(base, records, out, method="full", epochs=1, overrides={"train.batch_size": 4})
    write_jsonl(tmp_path / "unknown.jsonl", records[:2] + [{"text": "so long", "label": "meh"}])
    code, _, err = cli(capsys, tmp_path, "classify", "eval", "run", "unknown.jsonl", "--out", "eval")
    assert code == 2 and "unknown.jsonl record 3: label 'meh' is not one the classifier knows (bad, good)" in err
    assert not (tmp_path / "eval").exists()
    with pytest.raises(UserError, match="already exists"):
        train_classifier(base, records, out, method="full", epochs=1)
    with pytest.raises(UserError, match="empty"):
        predict(out, ["fine", " "])
    with pytest.raises(UserError, match="no field 'label'"):
        read_labelled([{"text": "a", "sentiment": "good"}])


def test_on_the_fly_augmentation_is_fixed_by_the_step_and_changes_between_epochs(base, tokenizer):
    from lmforge.data.augment import Augmenter
    from lmforge.recipes.classify import labelled_batches

    records = reviews(8)
    swap = Augmenter(synonym_rate=0, insert_rate=0, swap_rate=0.5, delete_rate=0, seed=0)  # no thesaurus needed
    batches = labelled_batches([r["text"] for r in records], [i % 2 for i in range(8)], tokenizer, batch_size=8,
                              seed=0, max_length=32, augment=swap)
    plain = labelled_batches([r["text"] for r in records], [i % 2 for i in range(8)], tokenizer, batch_size=8,
                            seed=0, max_length=32)
    first, again, next_epoch, unaugmented = batches(0, 0, 8), batches(0, 0, 8), batches(1, 0, 8), plain(0, 0, 8)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a resumed run sees the same batch
    assert not torch.equal(first["ids"], unaugmented["ids"])  # the words were swapped
    assert sorted(first["labels"].tolist()) == sorted(next_epoch["labels"].tolist())
    assert not torch.equal(first["ids"], next_epoch["ids"])


def test_lora_layers_keeps_only_the_last_blocks_adapters_trainable(make_model):
    from lmforge.recipes.classify import freeze_lower_adapters

    model = apply_lora(make_model("llama"), rank=2, alpha=4, dropout=0.0)
    freeze_lower_adapters(model, 1)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    last = model.config.n_layer - 1
    assert trainable and all(f".blocks.{last}." in name and "lora_" in name for name in trainable)
    for bad in (0, model.config.n_layer + 1):
        with pytest.raises(UserError, match="--lora-layers"):
            freeze_lower_adapters(model, bad)
