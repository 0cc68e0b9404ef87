"""Task metrics against the references a user would otherwise use (scikit-learn, rouge-score, sacrebleu)."""

import math

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from lmforge.errors import UserError
from lmforge.eval.metrics import classification_scores, perplexity, rouge, translation_scores
from lmforge.plots import plot_confusion


def test_classification_scores_match_scikit_learn():
    gold = ["pos", "neg", "neu", "pos", "pos", "neg", "neu", "neu", "pos", "neg"]
    pred = ["pos", "neg", "pos", "neg", "pos", "neg", "neu", "pos", "pos", "pos"]
    labels = ["neg", "neu", "pos"]
    scores = classification_scores(pred, gold, labels)
    assert scores["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert scores["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", labels=labels))
    assert scores["confusion"] == confusion_matrix(gold, pred, labels=labels).tolist()
    assert sum(scores["per_class"][label]["support"] for label in labels) == len(gold)


def test_macro_f1_ignores_labels_absent_from_gold_but_counts_wrong_predictions():
    scores = classification_scores(["a", "b", "c"], ["a", "b", "b"], ["a", "b", "c"])
    assert scores["macro_f1"] == pytest.approx(f1_score(["a", "b", "b"], ["a", "b", "c"], average="macro",
                                                        labels=["a", "b"]))


def test_rouge_identical_is_100_and_disjoint_is_0():
    assert rouge(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert rouge(["dogs bark loudly"], ["the cat sat"])["rouge1"] == 0.0
    partial = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert 0 < partial["rouge2"] < partial["rouge1"] < 100


def test_translation_scores_character_bleu_for_japanese():
    perfect = translation_scores(["初めに、神は天と地を創造された。"], ["初めに、神は天と地を創造された。"], "ja")
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["bleu_tokenize"] == "char"
    english = translation_scores(["in the beginning god made the heavens"],
                                 ["in the beginning god created the heavens and the earth"])
    assert 0 < english["bleu"] < 100 and english["bleu_tokenize"] == "13a"


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(UserError, match="empty references"):
        translation_scores(["a"], ["  "])
    with pytest.raises(UserError, match="no gold labels"):
        classification_scores([], [])


def test_perplexity_and_confusion_png(tmp_path):
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    png = plot_confusion([[5, 1], [2, 7]], ["rotten", "fresh"], tmp_path / "c.png", "test")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_write_report_json_and_table(tmp_path):
    import json

    from lmforge.eval.report import write_report

    rows = [{"system": "model", "accuracy": 0.8125}, {"system": "baseline", "accuracy": 0.75, "note": "tf-idf"}]
    paths = write_report(tmp_path, "classify", {"task": "classify", "n": 16}, rows, echo=False)
    saved = json.loads(paths["json"].read_text())
    assert saved["n"] == 16 and saved["rows"][1]["note"] == "tf-idf"
    table = paths["table"].read_text().splitlines()
    assert table[2] == "| system | accuracy | note |" and table[4] == "| model | 0.8125 |  |"


def test_reports_are_never_replaced(tmp_path):
    from lmforge.errors import UserError
    from lmforge.eval.report import write_report

    write_report(tmp_path, "lm", {"n": 1}, [{"loss": 1.0}], echo=False, extra={"lm_predictions.jsonl": "{}\n"})
    before = (tmp_path / "lm.json").read_text()
    with pytest.raises(UserError, match="already exists"):
        write_report(tmp_path, "lm", {"n": 2}, [{"loss": 2.0}], echo=False)
    assert (tmp_path / "lm.json").read_text() == before
    assert (tmp_path / "lm_predictions.jsonl").read_text() == "{}\n"
