"""lmforge models in EleutherAI's lm-evaluation-harness: the `lmforge` backend and `lmforge eval --harness`.

    lmforge eval runs/chat --harness lmforge_boolq,lmforge_mmlu --limit 400 --out runs/chat-harness
    lm_eval --model lmforge --model_args path=runs/chat --tasks lmforge_boolq --include_path DIR
    evaluate_harness("smollm2-135m-instruct", ["lmforge_boolq"], out="runs/h", limit=400)

The backend (`LMForgeLM`, registered as "lmforge") answers the harness's three request types through
lmforge's own forward pass and generate loop, for any decoder `lmforge.load` takes:

- `loglikelihood` (multiple choice, cloze): the harness's `TemplateLM` splits each request into context
  and continuation tokens exactly as its `hf` backend does; here the requests that share a context (the
  options of one question) are grouped, each context runs once, and only the continuation positions go
  through the LM head. A one-token continuation (" yes", " A") needs no second pass; longer ones run whole.
  Rows are sorted by length and batched with rows of nearly the same length (no row padded by more than a
  tenth of its batch's length: padding costs as much as tokens on a CPU), right-padded: attention is causal,
  so the padding after a row's tokens never reaches them and changes no score.
- `loglikelihood_rolling` (perplexity): the `hf` backend's disjoint windows of the context length,
  scored the same way.
- `generate_until`: `lmforge.infer.generate` (greedy unless the task samples), stop strings from `until`.

The log-probabilities are log-softmax of fp32 logits, as the `hf` backend computes them; the optional
extra `pip install 'lmforge[harness]'` provides the harness (a missing one is named in the error).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError

try:
    import lm_eval.models  # noqa: F401  (the harness's own backends first: its registry loads them only when empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the optional extra is missing: the backend class is not defined, `require` says why
    TemplateLM = None

eval_logger = logging.getLogger("lmforge.eval.harness")
HEAD_CHUNK = 512  # positions per LM-head matmul when scoring long continuations (fp32 logits: chunk x vocab)


def require_harness() -> None:
    if TemplateLM is None:
        raise UserError("the lm-evaluation-harness is not installed: pip install 'lmforge[harness]'")


def _decoder(model: Any, source: str) -> Any:
    """`model` if it is a decoder LM a harness can score, else a UserError naming what it is."""
    if hasattr(model, "labels") and hasattr(model, "probabilities"):
        raise UserError(f"{source} is a classifier; the harness scores language models (a decoder checkpoint)")
    if not hasattr(model, "hidden_states") or hasattr(model, "generation_batches"):
        raise UserError(f"{source} is a {type(model).__name__}; the harness backend scores decoder-only LMs")
    return model


if TemplateLM is not None:

    @register_model("lmforge")
    class LMForgeLM(TemplateLM):
        """The harness backend over an lmforge decoder (module docstring). `--model_args path=CKPT[,batch_size=16,
        device=cpu,dtype=fp32]`."""

        def __init__(self, path: str | None = None, model: Any = None, batch_size: int | str = 16,
                     device: str = "cpu", dtype: str = "fp32", **kwargs: Any):
            super().__init__()
            import lmforge.sources

            if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm_eval's default: cuda
                eval_logger.warning("no CUDA device here: the lmforge backend runs on the CPU")
                device = "cpu"
            if model is None:
                if path is None:
                    raise UserError("the lmforge backend needs path=CHECKPOINT in --model_args")
                if dtype not in lmforge.sources.GENERATION_DTYPES:
                    raise UserError(f"dtype={dtype}; expected one of {', '.join(lmforge.sources.GENERATION_DTYPES)}")
                model = lmforge.sources.load(path, device=device, dtype=lmforge.sources.GENERATION_DTYPES[dtype])
            self.model = _decoder(model, str(path or type(model).__name__)).eval()
            self.tokenizer = self.model.tokenizer
            self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_id

        @property
        def max_length(self) -> int:
            return self.model.config.block_size

        @property
        def tokenizer_name(self) -> str:
            return "lmforge"

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return self.tokenizer.encode(string)

        def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
            return self.tokenizer.decode(list(tokens))

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

        # ------------------------------------------------------------------------------------------
        # scoring

        def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                                  **kwargs: Any) -> list[tuple[float, bool]]:
            """(sum of log p(continuation | context), whether greedy decoding gives the continuation) of each."""
            return score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size,
                                       disable_tqdm)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            windows, owners = [], []
            for i, (string,) in enumerate(request.args for request in requests):
                for window in utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                              prefix_token=self.prefix_token_id,
                                                              max_seq_len=self.max_length, context_len=1):
                    windows.append(utils.make_disjoint_window(window))
                    owners.append(i)
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, score_continuations(self.model, windows, self.batch_size,
                                                                       disable_tqdm)):
                totals[owner] += logprob
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            """Each (context, gen_kwargs): greedy (or sampled, as the task asks) until a stop string or
            `max_gen_toks`, through lmforge's generate loop, in batches of requests with the same settings."""
            groups: dict[str, list[int]] = defaultdict(list)
            for i, request in enumerate(requests):
                groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
            out: list[str] = [""] * len(requests)
            for key, members in groups.items():
                settings = json.loads(key)
                until = settings.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(settings.get("max_gen_toks", 256))
                sample = bool(settings.get("do_sample", False)) and float(settings.get("temperature", 1.0)) > 0
                keep = max(1, self.max_length - new)  # the context's last tokens, leaving room to generate
                prompts = []
                for i in members:
                    ids = self.tok_encode(requests[i].args[0])
                    prompts.append(self.tok_decode(ids[-keep:]) if len(ids) > keep else requests[i].args[0])
                texts = self.model.generate(prompts, max_new_tokens=min(new, self.max_length - 1),
                                            temperature=float(settings.get("temperature", 1.0)) if sample else 0,
                                            stop=until, batch_size=self.batch_size, tokenizer=self.tokenizer)
                for i, text in zip(members, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return out


@torch.inference_mode()
def score_continuations(model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16,
                        disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is the continuation the greedy one) of each (context ids, continuation
    ids) pair, as the harness's `hf` backend defines them: the sequence is cut to the model's context from the
    left. One-token continuations that share a context are scored by one pass over it; the others run whole,
    and only their continuation positions go through the LM head (see the module docstring)."""
    from tqdm.auto import tqdm

    block = model.config.block_size
    shared: dict[tuple[int, ...], list[int]] = defaultdict(list)  # context -> its one-token continuations
    whole: list[tuple[int, list[int]]] = []  # (pair, the ids the model reads), for longer continuations
    for i, (context, continuation) in enumerate(pairs):
        ids = (list(context) + list(continuation))[-(block + 1):][:-1]
        if len(continuation) == 1:
            shared[tuple(ids)].append(i)
        else:
            whole.append((i, ids))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    progress = tqdm(total=len(pairs), desc="lmforge: scoring", disable=disable_tqdm)
    contexts = list(shared)
    for members in _similar_lengths([len(c) for c in contexts], batch_size):
        batch = [contexts[m] for m in members]
        hidden, lengths = _hidden(model, batch)
        logprobs = _head_logprobs(model, hidden[torch.arange(len(batch)), lengths - 1])  # (B, V): each row's last
        for row, context in enumerate(batch):
            best = int(logprobs[row].argmax())
            for i in shared[context]:
                token = pairs[i][1][0]
                results[i] = (float(logprobs[row, token]), best == token)
                progress.update(1)
    for members in _similar_lengths([len(ids) for _, ids in whole], batch_size):
        hidden, lengths = _hidden(model, [whole[m][1] for m in members])
        for row, i in enumerate(whole[m][0] for m in members):
            continuation = torch.tensor(pairs[i][1], device=hidden.device)
            end = int(lengths[row])
            logprobs = _head_logprobs(model, hidden[row, end - len(continuation):end])  # (n, V)
            chosen = logprobs.gather(1, continuation[:, None]).squeeze(1)
            results[i] = (float(chosen.sum()), bool((logprobs.argmax(-1) == continuation).all()))
            progress.update(1)
    progress.close()
    return results  # type: ignore[return-value]


def _similar_lengths(lengths: list[int], batch_size: int) -> list[list[int]]:
    """The indices of `lengths`, longest first, in batches of at most `batch_size` whose rows are each at least
    nine tenths as long as the batch's first: a long outlier runs alone instead of padding fifteen short rows
    to its length."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and len(batches[-1]) < batch_size and lengths[i] >= 0.9 * lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _hidden(model: Any, rows: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states (B, T, d) of token rows, right-padded into one batch, and each row's length (B,).
    Attention is causal, so a row's states are those it has alone; the positions past its length are padding."""
    from lmforge.infer import pad_right

    tokens, real = pad_right(rows, 0, next(model.parameters()).device)
    return model.hidden_states(tokens), real.sum(dim=1)


def _head_logprobs(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """log-softmax of the fp32 logits of hidden states (..., d), the LM head run HEAD_CHUNK positions at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = [torch.log_softmax(model.head(flat[i:i + HEAD_CHUNK]).float(), dim=-1)
           for i in range(0, flat.shape[0], HEAD_CHUNK)]
    return torch.cat(out).reshape(*hidden.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------
# lmforge eval --harness


def evaluate_harness(model: Any, tasks: Sequence[str], out: str | Path | None = None, limit: int | None = None,
                     num_fewshot: int | None = None, batch_size: int = 16, device: str = "cpu",
                     include_path: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run harness `tasks` (lmforge's local ones, see `lmforge.eval.harness_tasks`, or any stock task the
    harness can reach) on `model` (a path, or a loaded decoder) with the lmforge backend; write OUT/harness.json
    (the harness's results, configs and versions), OUT/harness.md (the table) and OUT/samples_TASK.jsonl (each
    example's scores and the choice made); return the report."""
    require_harness()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness_tasks import local_tasks
    from lmforge.eval.report import check_new_report, write_report

    if not tasks:
        raise UserError("--harness: name at least one task (e.g. lmforge_boolq,lmforge_mmlu)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: expected at least 1 example per task")
    if out is not None:
        check_new_report(Path(out), "harness", ["harness.json", "harness.md"])
    for path in include_path:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path}: no such directory of task configs")
    manager = TaskManager(include_path=[str(local_tasks()), *map(str, include_path)])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = ", ".join(t for t in manager.all_tasks if t.startswith("lmforge_"))
        raise UserError(f"unknown harness task(s): {', '.join(unknown)}; lmforge's local tasks: {local} "
                        f"(or any stock task whose data the harness can reach)")
    backend = LMForgeLM(model=model, batch_size=batch_size) if not isinstance(model, (str, Path)) else \
        LMForgeLM(path=str(model), batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=backend, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=True, batch_size=batch_size)
    rows = []
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            metric, _, flt = name.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            rows.append({"task": task, "metric": metric, "value": round(float(value), 4),
                         "stderr": round(float(stderr), 4) if isinstance(stderr, (int, float)) else None,
                         "examples": results.get("n-samples", {}).get(task, {}).get("effective")})
    report = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__, "tasks": list(tasks),
              "limit": limit, "num_fewshot": num_fewshot, "harness": lm_eval.__version__,
              "results": results["results"], "configs": results.get("configs"), "n-samples": results.get("n-samples")}
    if out is not None:
        samples = {f"samples_{task}.jsonl": "".join(json.dumps(s, default=str) + "\n" for s in task_samples)
                   for task, task_samples in results.get("samples", {}).items()}
        write_report(out, "harness", report, rows, extra=samples)
    report["samples"] = results.get("samples", {})
    return report
