"""An encoder-decoder against a decoder-only model of about the same size, trained from scratch on the
same pairs for the same number of steps, in one report (BLEU/chrF for translation, ROUGE for summaries).

    python bench/seq2seq_vs_decoder.py --task translate --steps 500 --eval-limit 150 --out runs/cmp-translate
    python bench/seq2seq_vs_decoder.py --task summarize --steps 300 --batch-size 8 --eval-limit 85 --out runs/cmp-sum
    python bench/seq2seq_vs_decoder.py --task summarize --kinds seq2seq cvae --steps 300 --out runs/cmp-cvae
    python bench/seq2seq_vs_decoder.py --quick --out /tmp/cmp           # a few steps, to check the plumbing

`--kinds` picks the models (default: decoder and seq2seq; `cvae` adds the conditional VAE of the
article, shaped like the encoder-decoder, with outputs for three draws of z). The models are
`gpt-micro` sized (d_model 256, 4 heads, context 256 by default): the decoder has 4
blocks, the encoder-decoder 2 encoder + 2 decoder blocks (its decoder blocks also have cross-attention,
so it has a few % more parameters; both counts are reported). Both use one tokenizer trained on the
training pairs, the same batch size, learning rate and schedule, and the same number of optimizer steps.
They read the pairs differently: the decoder sees "prompt + source + target" within its context of
--max-length tokens (the source is cut to fit, and pairs whose target leaves no room are left out; the
loss counts on the target only), the encoder-decoder sees up to --max-length source tokens and as many
target tokens. For short pairs (Bible verses) that is the same data; for long articles (xsum) the
encoder-decoder reads more of each article. Training time is reported for each (the machine's other load
is in the report too: compare the times only on a quiet machine). Prediction is greedy for both
(and beam search for the encoder-decoder with `--beam-size`). Writes OUT/report.json and OUT/report.md.
A model already trained in OUT (its `summary.json` is there) is evaluated without training it again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_state  # noqa: E402

from lmforge.api import load  # noqa: E402
from lmforge.eval.report import write_report  # noqa: E402
from lmforge.tasks import text2text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="translate", choices=["translate", "summarize"])
    parser.add_argument("--data", help="catalog dataset (default: the task's)")
    parser.add_argument("--direction", default="en-ja")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--eval-limit", type=int, default=300, help="test pairs scored (default: 300)")
    parser.add_argument("--beam-size", type=int, default=4, help="beam width for the encoder-decoder's second row")
    parser.add_argument("--kinds", nargs="+", default=["decoder", "seq2seq"], choices=["decoder", "seq2seq", "cvae"],
                        help="models to train (cvae: the conditional VAE, shaped like the encoder-decoder)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="20 steps and 20 test pairs: a plumbing check")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_limit = 20, 20
    out = Path(args.out)
    task = text2text.get_task(args.task, args.direction if args.task == "translate" else None)
    data = args.data or task.default_data
    train = {"train.max_steps": args.steps, "train.batch_size": args.batch_size, "train.lr": args.lr,
             "train.min_lr": args.lr / 10, "train.warmup_steps": max(1, args.steps // 20),
             "train.eval_interval": max(1, args.steps // 5), "train.eval_batches": 4}
    encoder_decoder = {"model.n_layer": 2, "model.n_encoder_layer": 2}
    shapes = {"decoder": {"model.n_layer": 4}, "seq2seq": encoder_decoder, "cvae": encoder_decoder}
    rows, runs = [], {}
    state = machine_state()
    for kind in args.kinds:
        shape, run = shapes[kind], out / kind
        if (run / "summary.json").is_file():  # trained by an earlier, interrupted run of this script
            summary = json.loads((run / "summary.json").read_text())
        else:
            summary = text2text.train_text_task(task, None, data, out=run, preset="gpt-micro", model_kind=kind,
                                                epochs=None, max_length=args.max_length, vocab_size=args.vocab_size,
                                                overrides={**train, **shape})
        seconds = summary["train_seconds"]
        model = load(run)
        parameters = sum(p.numel() for p in model.parameters())
        beams = [1, args.beam_size] if kind != "decoder" and args.beam_size > 1 else [1]
        for beam in beams:
            report = text2text.evaluate_text_task(task, model, data, "test", limit=args.eval_limit, beam_size=beam)
            row = {"system": f"{kind}" + (f", beam {beam}" if beam > 1 else ", greedy"), "parameters": parameters,
                   "train_seconds": round(seconds), "best_val_loss": summary.get("best_val_loss"),
                   **{k: v for k, v in report["rows"][0].items() if k != "system"},
                   "predict_seconds": report["predict_seconds"]}
            rows.append(row)
            emit({"figure": f"{args.task}_{kind}_beam{beam}", **row})
        runs[kind] = {"summary": summary, "examples": report["examples"][:3]}
        if kind == "cvae":  # different draws of z from the prior p(z | source): different outputs
            from lmforge.tasks.seq2seq import predict

            sources = [e["source"] for e in report["examples"][:2]]
            runs[kind]["outputs_for_z_seeds_0_1_2"] = [predict(model, sources, max_new_tokens=task.max_new_tokens,
                                                               z_seed=seed) for seed in range(3)]
    if task.metric == "rouge":
        pairs = text2text.task_pairs(task, data, "test", args.eval_limit)
        lead = text2text.score(task, [text2text.lead_sentence(p["source"]) for p in pairs],
                               [p["target"] for p in pairs])
        rows.append({"system": "lead-1 baseline", **{k: round(v, 4) for k, v in lead.items()}})
    write_report(out, "report", {"task": task.name, "data": data, "steps": args.steps, "batch_size": args.batch_size,
                                 "machine": state, "threads": os.environ.get("OMP_NUM_THREADS"), "runs": runs}, rows)
    print(json.dumps({"report": str(out / "report.md")}))


if __name__ == "__main__":
    main()
