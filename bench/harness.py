"""The lm-evaluation-harness backend: lmforge's against the harness's own `hf` backend, same weights, same task.

    python bench/harness.py                   # BoolQ, the first 400 questions, zero-shot (about 5 minutes)
    python bench/harness.py --tasks lmforge_boolq,lmforge_mmlu --limit 200
    python bench/harness.py --quick           # 40 questions: checks that it runs

SmolLM2-135M-Instruct in fp32 (`common.smollm2_fp32`), exported once with `lmforge export --format hf` for the
`hf` backend (transformers' LlamaForCausalLM, SDPA attention); both backends at batch 16 on the CPU, zero-shot,
the local task configs of `lmforge.eval.harness_tasks` (BoolQ: "{passage}\\nQuestion: {question}?\\nAnswer:",
choices no/yes, as the harness's stock boolq). The two run one after the other in this process, each timed
around `lm_eval.simple_evaluate` (data loading included, model loading not). Figures, one JSON line each:
accuracy per backend and task, how many examples chose differently, the largest difference of a choice's
log-likelihood; requests per second of each backend over all the tasks, and the speedup.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_state, smollm2_fp32  # noqa: E402


def hf_export() -> Path:
    from lmforge.api import export
    from lmforge.perf import cache_dir

    path = cache_dir() / "bench" / "harness" / "smollm2-hf"
    if not (path / "config.json").is_file():
        export(smollm2_fp32(), path)
    return path


def run(model, tasks: list[str], limit: int, manager) -> tuple[dict, float]:
    import lm_eval

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager, log_samples=True,
                                      batch_size=16, num_fewshot=0)
    return results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="lmforge_boolq")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import lm_eval.api.registry
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import LMForgeLM
    from lmforge.eval.harness_tasks import local_tasks

    limit = 40 if args.quick else args.limit
    tasks = args.tasks.split(",")
    emit(machine_state())
    manager = TaskManager(include_path=str(local_tasks()))
    ours = LMForgeLM(path=str(smollm2_fp32()), batch_size=16)
    hf = lm_eval.api.registry.get_model("hf")(pretrained=str(hf_export()), batch_size=16, dtype="float32",
                                              device="cpu")
    (ours_results, ours_s), (hf_results, hf_s) = run(ours, tasks, limit, manager), run(hf, tasks, limit, manager)
    requests = 0
    for task in tasks:
        a, b = ours_results["samples"][task], hf_results["samples"][task]
        requests += sum(len(s["resps"]) for s in a)
        differing = sum(sa["acc"] != sb["acc"] for sa, sb in zip(a, b))
        gap = max(abs(ra[0][0] - rb[0][0]) for sa, sb in zip(a, b) for ra, rb in zip(sa["resps"], sb["resps"]))
        emit({"figure": "harness_scores", "task": task, "examples": len(a),
              "accuracy_lmforge": round(ours_results["results"][task]["acc,none"], 4),
              "accuracy_hf": round(hf_results["results"][task]["acc,none"], 4),
              "examples_choosing_differently": differing, "max_loglikelihood_difference": float(f"{gap:.3g}")})
    emit({"figure": "harness_speed", "tasks": tasks, "requests": requests, "seconds_lmforge": round(ours_s, 1),
          "seconds_hf": round(hf_s, 1), "requests_per_s_lmforge": round(requests / ours_s, 2),
          "requests_per_s_hf": round(requests / hf_s, 2), "speedup": round(hf_s / ours_s, 2), "batch_size": 16,
          "num_fewshot": 0})


if __name__ == "__main__":
    main()
