"""The numbers a task is judged by: classification scores, ROUGE, BLEU and chrF, perplexity.

    scores = classification_scores(predicted, gold)        # accuracy, macro_f1, per-class, confusion
    rouge(summaries, references)                           # {"rouge1": .., "rouge2": .., "rougeL": ..}
    translation_scores(hypotheses, references, target_language="ja")   # {"bleu": .., "chrf": ..}
    perplexity(mean_loss_nats)
    reference_bleu(samples, heldout_lines), self_bleu(samples)   # a generator's samples: quality, diversity

Every function takes predictions and references as parallel lists and refuses mismatched counts,
empty lists and empty references with a one-line `UserError`. Scores are in [0, 100] for ROUGE,
BLEU and chrF (as papers report them) and in [0, 1] for accuracy and F1.
ROUGE is Google's `rouge-score` (Porter stemming, F-measure, rougeL over the whole text); BLEU and
chrF are `sacrebleu`'s corpus scores (tokenizer `13a`, or `char` for Japanese and Chinese targets,
which have no spaces between words). `reference_bleu` and `self_bleu` score a generator's samples as
Texygen and "Language GANs Falling Short" do: sentence BLEU-4 of each sample against a whole set of
references (held-out text, or the other samples), averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lmforge.errors import UserError

CHARACTER_LANGUAGES = ("ja", "zh")  # scripts without spaces: BLEU over characters


def check_parallel(predictions: Sequence[Any], references: Sequence[Any], what: str = "references") -> None:
    """Predictions and references must be non-empty and equally many."""
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} {what}; expected one for each")
    if not references:
        raise UserError(f"no {what} to score against")


def _check_texts(references: Sequence[str], what: str) -> None:
    empty = [i for i, r in enumerate(references) if not str(r).strip()]
    if empty:
        raise UserError(f"{len(empty)} empty {what} (first at index {empty[0]}); every reference needs text")


# ----------------------------------------------------------------------------------------------
# classification


def confusion_matrix(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """counts[i][j]: examples of gold label i predicted as label j."""
    index = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for p, g in zip(predicted, gold):
        if g not in index or p not in index:
            raise UserError(f"label {g if g not in index else p!r} is not one of {', '.join(map(str, labels))}")
        counts[index[g]][index[p]] += 1
    return counts


def classification_scores(predicted: Sequence[str], gold: Sequence[str],
                          labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    check_parallel(predicted, gold, "gold labels")
    labels = list(labels) if labels is not None else sorted(set(gold) | set(predicted))
    counts = confusion_matrix(predicted, gold, labels)
    per_class = {}
    for i, label in enumerate(labels):
        true_positive = counts[i][i]
        predicted_as = sum(row[i] for row in counts)
        support = sum(counts[i])
        precision = true_positive / predicted_as if predicted_as else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [label for label in labels if per_class[label]["support"]]
    return {
        "accuracy": sum(counts[i][i] for i in range(len(labels))) / len(gold),
        "macro_f1": sum(per_class[label]["f1"] for label in present) / len(present),
        "per_class": per_class,
        "labels": labels,
        "confusion": counts,
        "n": len(gold),
    }


# ----------------------------------------------------------------------------------------------
# generated text


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (x100) over the pairs."""
    from rouge_score import rouge_scorer

    check_parallel(predictions, references)
    _check_texts(references, "references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    return {name: 100 * total / len(references) for name, total in totals.items()}


def translation_scores(hypotheses: Sequence[str], references: Sequence[str],
                       target_language: str = "en") -> dict[str, Any]:
    """Corpus BLEU and chrF (x100), with the tokenizer BLEU needs for the target language."""
    import sacrebleu

    check_parallel(hypotheses, references)
    _check_texts(references, "references")
    tokenize = "char" if target_language in CHARACTER_LANGUAGES else "13a"
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    return {"bleu": bleu.score, "chrf": chrf.score, "bleu_tokenize": tokenize, "bleu_signature": str(bleu)}


def perplexity(mean_loss_nats: float) -> float:
    """exp of the mean next-token cross-entropy (nats per token)."""
    return math.exp(min(mean_loss_nats, 700.0))


# ----------------------------------------------------------------------------------------------
# samples of a generator: quality against a reference set, diversity among themselves (Texygen style)


class NgramReferences:
    """A set of reference texts (words split on spaces) ready for BLEU-n of many hypotheses against all of them.

    For every n-gram (n = 1..max_n) it keeps the largest count in any one reference (the clip of
    multi-reference BLEU) and the second largest, so `bleu(h, leave_out=i)` can score a hypothesis against
    every reference but the i-th (self-BLEU) without recounting.
    """

    def __init__(self, references: Sequence[str], max_n: int = 4):
        from collections import Counter

        if not references:
            raise UserError("no references to score against")
        self.max_n = max_n
        self.best: dict[tuple, tuple[int, int, int]] = {}  # n-gram -> (largest count, its reference, second largest)
        self.lengths = Counter()
        for i, text in enumerate(references):
            words = text.split()
            self.lengths[len(words)] += 1
            for n in range(1, max_n + 1):
                for gram, count in Counter(tuple(words[j:j + n]) for j in range(len(words) - n + 1)).items():
                    top, owner, second = self.best.get(gram, (0, -1, 0))
                    if count > top:
                        self.best[gram] = (count, i, top)
                    elif count > second:
                        self.best[gram] = (top, owner, count)
        self.length_of = [len(text.split()) for text in references]

    def bleu(self, hypothesis: str, leave_out: int | None = None, epsilon: float = 0.1) -> float:
        """Sentence BLEU-max_n (x100) of `hypothesis` against the references (but `leave_out`): clipped n-gram
        precisions with NLTK's smoothing method 1 (`epsilon` matches where there are none), their geometric
        mean, and the brevity penalty of the closest reference length."""
        from collections import Counter

        words = hypothesis.split()
        if not words:
            return 0.0
        log_precision = 0.0
        for n in range(1, self.max_n + 1):
            grams = Counter(tuple(words[j:j + n]) for j in range(len(words) - n + 1))
            total = sum(grams.values())
            matched = 0
            for gram, count in grams.items():
                top, owner, second = self.best.get(gram, (0, -1, 0))
                matched += min(count, second if owner == leave_out else top)
            if n == 1 and not matched:  # no word in common: 0, as NLTK has it
                return 0.0
            log_precision += math.log((matched or epsilon) / max(total, 1)) / self.max_n
        lengths = self.lengths
        if leave_out is not None:
            lengths = lengths.copy()
            lengths[self.length_of[leave_out]] -= 1
        closest = min((n for n, c in lengths.items() if c > 0), key=lambda n: (abs(n - len(words)), n))
        brevity = 1.0 if len(words) > closest else math.exp(1 - closest / len(words))
        return 100 * brevity * math.exp(log_precision)


def reference_bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Mean sentence BLEU-max_n (x100) of each hypothesis against the whole reference set (quality: higher is
    closer to real text)."""
    if not hypotheses:
        raise UserError("no hypotheses to score")
    table = NgramReferences(references, max_n)
    return sum(table.bleu(h) for h in hypotheses) / len(hypotheses)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Mean BLEU-max_n (x100) of each text against all the others (diversity: lower is more diverse)."""
    if len(texts) < 2:
        raise UserError(f"self-BLEU needs at least 2 texts, got {len(texts)}")
    table = NgramReferences(texts, max_n)
    return sum(table.bleu(t, leave_out=i) for i, t in enumerate(texts)) / len(texts)
