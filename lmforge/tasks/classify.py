"""`lmforge classify`: text classification with a decoder: a trained head, or zero-shot label words.

    classifier = load_classifier("runs/rt")                # OUT/best: backbone (or adapters) + head + labels
    predict(classifier, ["A gorgeous, witty film."])       # [{"label": "fresh", "probabilities": {...}}]
    evaluate_classifier("runs/rt", "rotten_tomatoes", "runs/rt-eval")   # report vs TF-IDF + LR, confusion PNG
    zero_shot("smollm2-135m-instruct", texts, {"fresh": "positive", "rotten": "negative"})

Training is the classifier recipe (`lmforge.recipes.classify`: the head, the checkpoint layout, the
data readers); this module uses trained classifiers: predictions, the evaluation report against a
TF-IDF + logistic-regression baseline, and zero-shot classification.
Zero-shot classification needs no training: each label has a verbaliser word, and the label whose
word the LM finds most likely after a prompt wins (probabilities: a softmax over the word scores).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge import crypto
from lmforge.errors import UserError
from lmforge.infer import model_device, pad_right
from lmforge.recipes.classify import (  # the training half of the task; names kept importable from here
    DEFAULT_MAX_LENGTH,
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    Classifier,
    Records,
    check_known_labels,
    label_names,
    read_labelled,
)

DEFAULT_TEMPLATE = "Text: {text}\nLabel:"  # 0.67 on 200 rotten_tomatoes validation texts with SmolLM2-135M


# ----------------------------------------------------------------------------------------------
# data: labelled texts from the catalog, local files or memory


def read_texts(source: str | Path, text_field: str = "text") -> list[str]:
    """Texts to classify: one per line of a .txt file, or the `text_field` of each record of a file
    `lmforge.data.load` reads (.jsonl, .csv, .parquet)."""
    from lmforge.data import load

    path = Path(source)
    if not path.is_file():
        raise UserError(f"no such file: {path} (expected a .txt, .jsonl or .csv file of texts)")
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [(f"{path.name}:{n}", {text_field: line}) for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        records = [(f"{path.name} record {i}", r) for i, r in enumerate(load(path), start=1)]
    texts = []
    for name, record in records:
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{name}: no text in field {text_field!r}; pass --text-field")
        texts.append(text)
    if not texts:
        raise UserError(f"{path} holds no texts")
    return texts


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A trained classifier from its checkpoint directory, or the `best/` checkpoint of its run directory,
    on `device` (as `lmforge.load` takes it)."""
    import lmforge.sources
    from lmforge.train.checkpoint import load_tensors, verified_checkpoint

    directory = verified_checkpoint(path)
    if not (directory / HEAD_CONFIG).is_file() or not (directory / HEAD_WEIGHTS).is_file():
        raise UserError(f"{directory} is not a classifier ({HEAD_CONFIG} or {HEAD_WEIGHTS} is missing); "
                        f"train one with: lmforge classify train MODEL DATA --out DIR")
    config = json.loads(crypto.read_bytes(directory / HEAD_CONFIG))
    backbone = lmforge.sources.load(directory, device=device)
    classifier = Classifier(backbone, config["labels"], config.get("max_length", DEFAULT_MAX_LENGTH))
    classifier.head.load_state_dict(load_tensors(directory / HEAD_WEIGHTS))
    return classifier.to(model_device(backbone)).eval()


def predict(classifier: Classifier | str | Path, texts: Sequence[str], batch_size: int = 32,
            progress: bool = False, device: str | torch.device = "auto") -> list[dict[str, Any]]:
    """`{"label": best label, "probabilities": {label: p}}` for each text (a path is loaded onto `device`)."""
    if isinstance(classifier, (str, Path)):
        classifier = load_classifier(classifier, device)
    empty = [i for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise UserError(f"text {empty[0] + 1} is empty; every text to classify needs some words")
    probabilities = classifier.probabilities(texts, batch_size, progress)
    return [{"label": classifier.labels[int(p.argmax())],
             "probabilities": {label: round(float(v), 6) for label, v in zip(classifier.labels, p)}}
            for p in probabilities]


def print_predictions(classifier: str | Path, text: list[str] | None = None, data: str | Path | None = None,
                      text_field: str = "text", device: str = "auto", he: bool = False) -> None:
    """Label texts, with probabilities: one JSON line per text.

    Each line: {"text", "label", "probabilities": {label: p}}. Give the texts with --text or --data,
    one of the two. With --he the head runs on encrypted features (CKKS: lmforge.tasks.he), client
    and server sides in this process, and each line adds "he": bytes up and down, milliseconds per
    side and the largest difference from the plaintext scores.

    Args:
        classifier: a classifier run or checkpoint directory
        text: a text to classify (repeatable)
        data: a .txt (one text a line), .jsonl or .csv file of texts
        text_field: the field / column of the text in data
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
        he: score through homomorphic encryption: the features encrypted on the client, the head applied
            to the ciphertext (both sides in this process, a demonstration)
    """
    if bool(text) == bool(data):
        raise UserError("give the texts to classify with --text (repeatable) or --data FILE, one of the two")
    texts = text or read_texts(data, text_field)
    if he:
        from lmforge.tasks.he import he_predict

        predictions, run = he_predict(load_classifier(classifier, device), texts, progress=bool(data))
        print(f"encrypted inference: CKKS degree {run['poly_modulus_degree']}, moduli {run['coeff_mod_bit_sizes']} "
              f"bits, scale 2^{run['scale_bits']}; public context {run['context_bytes'] / 1e6:.1f} MB "
              f"(sent once); the server side held no secret key", file=sys.stderr)
    else:
        predictions = predict(classifier, texts, progress=bool(data), device=device)
    for one, prediction in zip(texts, predictions):
        print(json.dumps({"text": one, **prediction}, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------
# zero-shot: label words scored by a plain LM


def parse_label_words(spec: str | dict[str, str]) -> dict[str, str]:
    """`"fresh=positive,rotten=negative"` (or a dict) -> {label: word}; a bare `pos,neg` uses the labels themselves."""
    if isinstance(spec, dict):
        pairs = dict(spec)
    else:
        pairs = {}
        for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
            label, _, word = part.partition("=")
            pairs[label.strip()] = (word if word else label).strip()
    if len(pairs) < 2 or not all(pairs.values()) or not all(pairs):
        raise UserError(f"--labels {spec!r}: expected two or more LABEL=WORD pairs, "
                        f"e.g. fresh=positive,rotten=negative")
    return pairs


@torch.no_grad()
def label_word_scores(model: Any, texts: Sequence[str], label_words: dict[str, str],
                      template: str = DEFAULT_TEMPLATE, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Log-probability (N, n_labels) the LM gives each label's word (all its tokens) after the prompt.

    The prompt is `template` with `{text}` and optionally `{choices}` (the words, comma-separated); the
    word follows it after a space. Sequences shared by several labels (one-token words) are run once.
    """
    if "{text}" not in template:
        raise UserError(f"--template {template!r} has no {{text}} placeholder")
    tokenizer = model.tokenizer
    words = list(label_words.values())
    word_ids = [tokenizer.encode(" " + w) for w in words]
    prompts = tokenizer.encode_batch([template.replace("{choices}", ", ".join(words)).replace("{text}", t)
                                      for t in texts])
    context = model.config.block_size
    # each (text, label) needs the LM's predictions after prompt + word[:-1]; identical sequences run once
    sequences: dict[tuple[int, ...], int] = {}
    wanted = []  # (text, label, sequence, first position, word ids)
    for i, prompt in enumerate(prompts):
        longest = max(len(w) for w in word_ids)
        prompt = prompt[-(context - longest):]  # keep the end of the prompt, where the question is
        for j, word in enumerate(word_ids):
            sequence = tuple(prompt + word[:-1])
            wanted.append((i, j, sequences.setdefault(sequence, len(sequences)), len(prompt) - 1, word))
    unique = list(sequences)
    device = next(model.parameters()).device
    log_probs: list[torch.Tensor | None] = [None] * len(unique)  # (len, vocab) log-softmax for the word positions
    first = {}
    for _, _, s, position, _ in wanted:
        first[s] = min(first.get(s, position), position)
    order = sorted(range(len(unique)), key=lambda s: len(unique[s]))
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch", desc="zero-shot"):
        picks = order[start:start + batch_size]
        ids, mask = pad_right([unique[s] for s in picks], tokenizer.eos_id, device)
        lengths = mask.sum(1)
        hidden = model.hidden_states(ids)  # (B, T, d)
        for row, s in enumerate(picks):
            h = hidden[row, first[s]:int(lengths[row])]  # the positions that predict word tokens
            log_probs[s] = (h @ model.head_weight.T).float().log_softmax(-1).cpu()
    scores = torch.zeros(len(texts), len(words))
    for i, j, s, position, word in wanted:
        rows = log_probs[s][position - first[s]:position - first[s] + len(word)]
        scores[i, j] = rows[torch.arange(len(word)), torch.tensor(word)].sum()
    return scores


def zero_shot(model: Any, texts: Sequence[str], label_words: str | dict[str, str],
              template: str = DEFAULT_TEMPLATE, batch_size: int = 16, progress: bool = False,
              device: str | torch.device = "auto") -> list[dict[str, Any]]:
    """`{"label", "probabilities"}` for each text: the label whose word the LM prefers after the prompt (a
    path is loaded onto `device`)."""
    import lmforge.sources

    pairs = parse_label_words(label_words)
    if isinstance(model, (str, Path)):
        model = lmforge.sources.load(model, device=device)
    empty = [i for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise UserError(f"text {empty[0] + 1} is empty; every text to classify needs some words")
    labels = list(pairs)
    probabilities = label_word_scores(model.eval(), texts, pairs, template, batch_size, progress).softmax(-1)
    return [{"label": labels[int(p.argmax())],
             "probabilities": {label: round(float(v), 6) for label, v in zip(labels, p)}} for p in probabilities]


def run_zero_shot(
    model: str | Path,
    labels: str,
    data: str | Path | None = None,
    template: str = DEFAULT_TEMPLATE,
    text: list[str] | None = None,
    split: str = "test",
    out: str | Path | None = None,
    train_data: str | Path | None = None,
    text_field: str = "text",
    label_field: str = "label",
    device: str = "auto",
) -> dict[str, Any] | None:
    """Classify by the LM's likelihood of each label's word: texts, or a report on labelled data.

    Scores each label's word after a prompt with a plain LM; the likeliest wins. With labelled DATA:
    a report with accuracy, macro-F1 and a confusion matrix (and the TF-IDF baseline, for a catalog
    dataset or with --train-data), returned. With --text: predictions as JSON lines.

    Args:
        model: a language model (checkpoint, Hugging Face directory, .gguf file or catalog model)
        labels: LABEL=WORD pairs, e.g. fresh=positive,rotten=negative
        data: labelled texts: a catalog dataset (rotten_tomatoes) or a .jsonl/.csv file with text and
            label columns
        template: the prompt, with {text} and optionally {choices} (the words, comma-separated)
        text: a text to classify (repeatable), instead of data
        split: the split of a catalog dataset
        out: the directory for the report (needed with data)
        train_data: training data for the TF-IDF baseline in the same report
        text_field: the field / column of the text
        label_field: the field / column of the label
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    if bool(text) == bool(data):
        raise UserError("give DATA (labelled texts to score) or --text (texts to classify), one of the two")
    if text:
        for one, prediction in zip(text, zero_shot(model, text, labels, template, device=device)):
            print(json.dumps({"text": one, **prediction}, ensure_ascii=False))
        return None
    if out is None:
        raise UserError("zero-shot on DATA writes a report: give --out DIR")
    return evaluate_classifier(None, data, out, split, train_data, text_field, label_field, model, labels, template,
                               device=device)


# ----------------------------------------------------------------------------------------------
# the baseline and the evaluation report


def tfidf_baseline(train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str],
                   seed: int = 0) -> list[dict[str, Any]]:
    """TF-IDF (words and word pairs, sublinear tf) + logistic regression trained on the train texts;
    predictions for `texts` in the same shape as `predict`. Fixed settings, not tuned on any test data."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(set(train_labels)) < 2:
        raise UserError("the baseline's training data has a single class; need at least 2")
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                             LogisticRegression(C=4.0, max_iter=2000, random_state=seed))
    pipeline.fit(list(train_texts), list(train_labels))
    classes = [str(c) for c in pipeline.classes_]
    return [{"label": classes[int(p.argmax())], "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)}}
            for p in pipeline.predict_proba(list(texts))]


def evaluate_classifier(
    classifier: str | Path | Classifier | None,
    data: str | Path | Records,
    out: str | Path,
    split: str = "test",
    train_data: str | Path | Records | None = None,
    text_field: str = "text",
    label_field: str = "label",
    zero_shot_model: str | Path | None = None,
    label_words: str | dict[str, str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    name: str = "classify",
    device: str = "auto",
) -> dict[str, Any]:
    """Accuracy, macro-F1 and confusion PNGs of a classifier, next to a TF-IDF + LR baseline.

    Scores the classifier on the data next to a TF-IDF + logistic-regression baseline and, with a
    zero-shot model and label words, zero-shot label words. Writes OUT/NAME.json and OUT/NAME.md
    (one row per system: accuracy, macro-F1, seconds) and a confusion-matrix PNG per system; returns
    the report.

    Args:
        classifier: a classifier run or checkpoint directory (in Python also a Classifier, or None
            for the other systems only)
        data: labelled texts: a catalog dataset (rotten_tomatoes) or a .jsonl/.csv file with text and
            label columns (in Python also records)
        out: the directory for classify.json, classify.md and the confusion PNGs
        split: the split of a catalog dataset
        train_data: what the baseline trains on (default: the catalog's train split, or the
            classifier's training file)
        text_field: the field / column of the text
        label_field: the field / column of the label
        zero_shot_model: also score zero-shot label words with this LM (needs label words)
        label_words: LABEL=WORD pairs for the zero-shot model, e.g. fresh=positive,rotten=negative
        template: the zero-shot prompt, with {text} and optionally {choices}
        name: the report's file name (NAME.json, NAME.md)
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    from lmforge.eval.metrics import classification_scores
    from lmforge.eval.report import check_new_report, write_report
    from lmforge.plots import plot_confusion
    from lmforge.train.checkpoint import read_info

    out = Path(out)
    check_new_report(out, name)
    examples = read_labelled(data, split, text_field, label_field)
    texts, gold = [e.text for e in examples], [e.label for e in examples]
    systems: dict[str, tuple[list[dict[str, Any]], float]] = {}
    train_fields = (text_field, label_field)
    labels: list[str] | None = None
    where = str(classifier) if isinstance(classifier, (str, Path)) else None
    if classifier is not None:
        if isinstance(classifier, (str, Path)):
            info = read_info(classifier)
            if train_data is None and isinstance(data, (str, Path)) and Path(data).exists():
                recorded = info.get("data")
                if recorded and Path(recorded).exists():  # the file the classifier was trained on, with its fields
                    train_data = recorded
                    train_fields = (info.get("text_field", "text"), info.get("label_field", "label"))
            classifier = load_classifier(classifier, device)
        labels = classifier.labels
        check_known_labels(examples, labels)
        start = time.perf_counter()
        systems[f"lmforge classifier ({where or 'in memory'})"] = (predict(classifier, texts, progress=True),
                                                                   time.perf_counter() - start)
    if train_data is None and isinstance(data, (str, Path)) and not Path(data).exists():
        train_data = data  # a catalog dataset: the baseline trains on its train split
    if train_data is not None:
        train = read_labelled(train_data, "train", *train_fields)
        labels = labels or label_names(train, str(train_data))
        start = time.perf_counter()
        systems["TF-IDF + logistic regression"] = (tfidf_baseline([e.text for e in train], [e.label for e in train],
                                                                  texts), time.perf_counter() - start)
    if zero_shot_model is not None:
        if label_words is None:
            raise UserError("zero-shot scoring needs --label-words LABEL=WORD,... as well as --zero-shot MODEL")
        words = parse_label_words(label_words)
        labels = labels or sorted(words)
        missing = sorted(set(labels) - set(words))
        if missing:
            raise UserError(f"--label-words gives no word for the label(s) {', '.join(missing)}")
        start = time.perf_counter()
        systems[f"zero-shot {Path(str(zero_shot_model)).name} ({', '.join(f'{k}={v}' for k, v in words.items())})"] = (
            zero_shot(zero_shot_model, texts, words, template, progress=True, device=device),
            time.perf_counter() - start)
    if not systems:
        raise UserError("nothing to evaluate: give a classifier, training data for the baseline, or a zero-shot model")
    labels = labels or sorted(set(gold))
    check_known_labels(examples, labels)
    report: dict[str, Any] = {"data": str(data) if isinstance(data, (str, Path)) else f"{len(examples)} records",
                              "split": split, "n": len(examples), "labels": labels, "systems": {}}
    rows = []
    for i, (system, (predictions, seconds)) in enumerate(systems.items()):
        scores = classification_scores([p["label"] for p in predictions], gold, labels)
        png = plot_confusion(scores["confusion"], labels, _mkdir(out) / f"confusion-{i}.png",
                             title=f"{system}\naccuracy {scores['accuracy']:.3f}")
        report["systems"][system] = {**scores, "seconds": round(seconds, 2), "confusion_png": str(png)}
        rows.append({"system": system, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                     **{f"f1 {label}": scores["per_class"][label]["f1"] for label in labels},
                     "seconds": round(seconds, 1)})
    report["paths"] = {k: str(v) for k, v in write_report(out, name, report, rows).items()}
    return report


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
