"""Encrypted inference on rotten_tomatoes: CKKS scores vs plaintext scores, latency and sizes per request.

    python bench/he.py --out runs/he-bench [--checkpoint runs/rt-bench/lora] [--threads 2]
    python bench/he.py --out runs/he-quick --quick         # a tiny check: 2 training steps, 16 texts

A LoRA classifier on SmolLM2-135M-Instruct (`--checkpoint`, or one trained here within `--minutes`),
then for every text of the test split: the backbone's features once, in batches (the client's work,
not encrypted), and per text the encrypted path of `lmforge.tasks.he` (client encrypt, server `W x + b`
on the ciphertext under the public context, client decrypt), compared with the plaintext head on the
same features. Writes OUT/he.json and OUT/he.md: label agreement (target 100%), max |score difference|
(target <= 1e-3), median and p90 milliseconds of each step, bytes up and down per request, the public
context's size; prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.data import load
from lmforge.eval.report import check_new_report, write_report
from lmforge.recipes.classify import train_classifier
from lmforge.tasks.classify import load_classifier
from lmforge.tasks.he import (
    COEFF_MOD_BIT_SIZES,
    SCALE_BITS,
    HEClient,
    degree_for,
    head_weights,
    load_public_context,
    score_encrypted,
    softmax,
)

SMOLLM2_NATIVE = Path("runs/smollm2-native")  # `lmforge import smollm2-135m-instruct runs/smollm2-native`


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/he-bench")
    parser.add_argument("--checkpoint", help="a classifier run or checkpoint (default: train one into OUT/clf)")
    parser.add_argument("--model", default=str(SMOLLM2_NATIVE) if SMOLLM2_NATIVE.exists() else "smollm2-135m-instruct")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (without --checkpoint)")
    parser.add_argument("--max-steps", type=int, default=120, help="training steps (batch 16)")
    parser.add_argument("--limit", type=int, help="score only the first N test texts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="a tiny check: 2 training steps, 16 texts")
    args = parser.parse_args()
    if args.quick:
        args.max_steps, args.limit = 2, args.limit or 16

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_new_report(out, "he")
    checkpoint = Path(args.checkpoint) if args.checkpoint else out / "clf"
    if args.checkpoint is None and not (checkpoint / "summary.json").is_file():
        start = time.perf_counter()
        summary = train_classifier(
            args.model, load("rotten_tomatoes", "train"), checkpoint, method="lora", epochs=None,
            val_data=load("rotten_tomatoes", "validation")[:16 if args.quick else 200], max_length=64, lora_rank=8,
            lora_alpha=16, lora_layers=10,
            overrides={"train.max_steps": args.max_steps, "train.max_minutes": args.minutes, "train.lr": 1e-3,
                       "train.batch_size": 16, "train.eval_interval": max(1, args.max_steps // 2),
                       "train.log_interval": 10})
        print(json.dumps({"figure": "training", "seconds": round(time.perf_counter() - start, 1),
                          "step": summary["step"], "val_accuracy": summary.get("val_accuracy")}))
    classifier = load_classifier(checkpoint, "cpu")
    records = load("rotten_tomatoes", "test")[:args.limit]
    texts, gold = [r["text"] for r in records], [str(r["label"]) for r in records]

    start = time.perf_counter()
    features = classifier.features(texts, 32, progress=True).double().cpu()  # the client's backbone, batched
    feature_seconds = time.perf_counter() - start
    weight, bias = head_weights(classifier)
    plain = features.numpy() @ weight.T + bias
    served = classifier.probabilities(texts[:8]).argmax(1).numpy()  # the float64 head labels as the served one does
    assert (plain[:8].argmax(1) == served).all()

    start = time.perf_counter()
    client = HEClient(features.shape[1])
    public = client.public_context()
    keygen_seconds = time.perf_counter() - start
    start = time.perf_counter()
    server = load_public_context(public, features.shape[1])
    load_seconds = time.perf_counter() - start
    assert not server.has_secret_key()

    times: dict[str, list[float]] = {"encrypt": [], "server": [], "decrypt": []}
    up, down, diffs, probability_diffs, agree, he_labels = [], [], [], [], 0, []
    for row, reference in tqdm(list(zip(features, plain)), unit="text", desc="encrypted"):
        t0 = time.perf_counter()
        ciphertext = client.encrypt_features(row)
        t1 = time.perf_counter()
        answer = score_encrypted(server, weight, bias, ciphertext)
        t2 = time.perf_counter()
        scores = client.decrypt(answer)
        t3 = time.perf_counter()
        for name, seconds in (("encrypt", t1 - t0), ("server", t2 - t1), ("decrypt", t3 - t2)):
            times[name].append(seconds * 1e3)
        up.append(len(ciphertext))
        down.append(sum(map(len, answer)))
        diffs.append(float(np.abs(scores - reference).max()))
        probability_diffs.append(float(np.abs(softmax(scores) - softmax(reference)).max()))
        agree += int(scores.argmax() == reference.argmax())
        he_labels.append(classifier.labels[int(scores.argmax())])

    n = len(texts)
    plain_labels = [classifier.labels[int(i)] for i in plain.argmax(1)]
    report = {
        "data": "rotten_tomatoes test split (catalog)", "n": n, "checkpoint": str(checkpoint),
        "parameters": {"poly_modulus_degree": degree_for(features.shape[1]),
                       "coeff_mod_bit_sizes": list(COEFF_MOD_BIT_SIZES), "scale_bits": SCALE_BITS,
                       "features": features.shape[1], "labels": classifier.labels},
        "label_agreement": agree / n, "max_abs_score_diff": max(diffs),
        "max_abs_probability_diff": max(probability_diffs),
        "accuracy_plaintext": sum(p == g for p, g in zip(plain_labels, gold)) / n,
        "accuracy_encrypted": sum(p == g for p, g in zip(he_labels, gold)) / n,
        "public_context_bytes": len(public), "keygen_seconds": round(keygen_seconds, 3),
        "server_context_load_seconds": round(load_seconds, 3),
        "features_ms_per_text": round(feature_seconds * 1e3 / n, 2),
        "bytes_up_per_request": statistics.median(up), "bytes_down_per_request": statistics.median(down),
        "ms": {name: {"median": round(statistics.median(v), 2), "p90": round(percentile(v, 90), 2)}
               for name, v in times.items()},
        "torch_threads": args.threads,
    }
    rows = [{"figure": "label agreement (encrypted vs plaintext)", "value": f"{agree}/{n} ({agree / n:.2%})"},
            {"figure": "max abs score difference (logits)", "value": f"{max(diffs):.2e}"},
            {"figure": "max abs probability difference", "value": f"{max(probability_diffs):.2e}"},
            {"figure": "accuracy plaintext / encrypted", "value": f"{report['accuracy_plaintext']:.4f} / "
                                                                  f"{report['accuracy_encrypted']:.4f}"},
            *({"figure": f"ms {name} (median / p90)", "value": f"{v['median']} / {v['p90']}"}
              for name, v in report["ms"].items()),
            {"figure": "features on the client, ms per text (batched, not encrypted)",
             "value": str(report["features_ms_per_text"])},
            {"figure": "bytes up / down per request", "value": f"{report['bytes_up_per_request']:,.0f} / "
                                                              f"{report['bytes_down_per_request']:,.0f}"},
            {"figure": "public context (sent once)", "value": f"{len(public):,} bytes"}]
    paths = write_report(out, "he", report, rows)
    print(json.dumps({"figure": "he", **{k: v for k, v in report.items() if k != "parameters"},
                      "table": str(paths["table"])}))


if __name__ == "__main__":
    main()
