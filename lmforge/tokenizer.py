"""Byte-level BPE tokenizers on Hugging Face `tokenizers`, with special tokens and a chat template.

Train one on your own text, save it, load it back:

    tok = train_tokenizer(texts, vocab_size=8192)
    ids = tok.encode("To be, or not to be")
    assert tok.decode(ids) == "To be, or not to be"
    tok.save("runs/tok")                      # writes runs/tok/tokenizer.json
    tok = Tokenizer.load("runs/tok")

Or take a pretrained model's tokenizer (a Hugging Face directory, a transformers tokenizer, or
GPT-2's vocab.json + merges.txt) and render chats with its template:

    tok = Tokenizer.from_hf("path/to/SmolLM2")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Text is split into bytes before merging (GPT-2 style), so every UTF-8 string round-trips exactly:
`decode(encode(s)) == s` for any language, emoji, tabs, "\\r\\n" or runs of spaces. The special tokens
live in the tokenizer.json as added special tokens; the end-of-text token (`eos_id`) is the configured
`eos_token`, else the first special token (lowest id).

The optional metadata (`eos_token`, `bos_token`, `chat_template`, `model_max_length`) is kept in a
Hugging Face style `tokenizer_config.json` beside `tokenizer.json`; a tokenizer without metadata (one
trained here) is the single `tokenizer.json` file.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge import crypto
from lmforge.errors import UserError
from lmforge.files import current_umask

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where recent transformers versions save the chat template
DEFAULT_EOS = "<|endoftext|>"


class Tokenizer:
    """A text <-> token-id mapping with special tokens; `backend` is the raw `tokenizers.Tokenizer`.

    `eos_token` (default: the first special token), `bos_token`, `chat_template` (a Jinja template as
    in Hugging Face tokenizers) and `model_max_length` are optional metadata.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        eos_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens: list[str] = [added[i].content for i in sorted(added) if added[i].special]
        if not self.special_tokens and eos_token is None:
            raise UserError(
                "tokenizer has no special tokens; expected an end-of-text token such as "
                f"{DEFAULT_EOS!r} as its first added special token"
            )
        for name, token in (("eos_token", eos_token), ("bos_token", bos_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise UserError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        self._eos_token = eos_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        eos_id = backend.token_to_id(self.eos_token)
        assert eos_id is not None
        self.eos_id: int = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the model's embedding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str:
        """The end-of-text token's string, e.g. "<|endoftext|>": the configured one, else the first special token."""
        return self._eos_token if self._eos_token is not None else self.special_tokens[0]

    @property
    def bos_id(self) -> int | None:
        """The id of the beginning-of-text token, if the tokenizer has one."""
        return self.backend.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def has_metadata(self) -> bool:
        """Whether there is anything to write into tokenizer_config.json (eos, bos, chat template, length)."""
        return any(v is not None for v in (self._eos_token, self.bos_token, self.chat_template, self.model_max_length))

    def config_dict(self) -> dict[str, Any]:
        """The Hugging Face style tokenizer_config.json contents (what transformers' AutoTokenizer reads)."""
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                                  "bos_token": self.bos_token}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        return config

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The prompt text of a chat (`[{"role": "user", "content": "Hi"}, ...]`), rendered by `chat_template`.

        The template runs in Jinja's sandbox as in transformers: it sees `messages`,
        `add_generation_prompt`, `bos_token`, `eos_token` and can call `raise_exception(message)`.
        """
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template; use a chat model's tokenizer (e.g. lmforge import "
                            "smollm2-135m-instruct) or give the prompt as plain text")
        import jinja2

        try:
            template = _compile_chat_template(self.chat_template)
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise UserError(f"chat template: {e}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special-token strings in the text map to their ids)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel (the same ids as `encode` of each text).

        Long texts are cut into pieces at line breaks that no token can span, so that one long
        document (a whole play, a book) is spread over all CPU cores too.
        """
        texts = list(texts)
        if not self._cuttable:
            return self._encode_many(texts)
        pieces, owners = [], []
        for i, text in enumerate(texts):
            for piece in _pieces(text):
                pieces.append(piece)
                owners.append(i)
        ids: list[list[int]] = [[] for _ in texts]
        for i, piece_ids in zip(owners, self._encode_many(pieces)):
            ids[i].extend(piece_ids)
        return ids

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets we do not use
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    @property
    def _cuttable(self) -> bool:
        """Whether texts can be cut at safe line breaks without changing the ids (see `_pieces`)."""
        pre = self.backend.pre_tokenizer
        return (
            self.backend.normalizer is None
            and isinstance(pre, pre_tokenizers.ByteLevel)
            and not pre.add_prefix_space
            and pre.use_regex
            and not any("\n" in t for t in self.special_tokens)
        )

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; special tokens are kept unless `skip_special_tokens`."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id (byte-level form, e.g. "Ġthe"), or None if out of range."""
        return self.backend.id_to_token(token_id)

    def to_json(self) -> str:
        """The whole tokenizer as the JSON text of a tokenizer.json file."""
        return self.backend.to_str()

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer to `path/tokenizer.json`, or to `path` itself if it ends in .json.

        Metadata (eos/bos tokens, chat template) goes into `tokenizer_config.json` beside a file named
        tokenizer.json (a stale one is removed when there is none). Each write is atomic (temp file +
        rename). Returns the tokenizer file written.
        """
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        if file.name == TOKENIZER_FILE:
            config = file.with_name(TOKENIZER_CONFIG_FILE)
            if self.has_metadata:
                _write_atomic(config, json.dumps(self.config_dict(), indent=2, ensure_ascii=False) + "\n")
            else:
                config.unlink(missing_ok=True)
        _write_atomic(file, self.to_json())
        return file

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding tokenizer.json (and tokenizer_config.json), or from the json file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            if path.is_dir():
                raise UserError(f"no {TOKENIZER_FILE} in {path}; expected a tokenizer saved by lmforge")
            raise UserError(f"no such tokenizer file or directory: {path}")
        backend = _read_backend(file)
        metadata = _read_metadata(file.parent) if file.name == TOKENIZER_FILE else {}
        try:
            return cls(backend, **metadata)
        except UserError as e:
            raise UserError(f"{file}: {e}") from None

    @classmethod
    def from_hf(cls, source: Any) -> Tokenizer:
        """A Tokenizer from a Hugging Face tokenizer: a transformers fast tokenizer object, or a directory.

        A directory is read with `tokenizers` alone when it holds tokenizer.json (plus tokenizer_config.json
        and chat_template.jinja); GPT-2's vocab.json + merges.txt become a byte-level BPE tokenizer; anything
        else (e.g. a sentencepiece tokenizer.model) goes through transformers' AutoTokenizer.
        """
        if isinstance(source, (str, Path)):
            directory = Path(source)
            if not directory.is_dir():
                raise UserError(f"no such tokenizer directory: {directory}")
            if (directory / TOKENIZER_FILE).is_file():
                return cls.load(directory)
            metadata = _read_metadata(directory)
            tokenizer_class = _read_json(directory / TOKENIZER_CONFIG_FILE).get("tokenizer_class") or "GPT2"
            vocab, merges = directory / "vocab.json", directory / "merges.txt"
            if vocab.is_file() and merges.is_file() and tokenizer_class.startswith("GPT2"):
                bpe = cls.from_bpe_files(vocab, merges)
                return cls(bpe.backend, **{"eos_token": bpe.eos_token, **metadata})
            import transformers

            try:
                source = transformers.AutoTokenizer.from_pretrained(str(directory))
            except Exception as e:  # transformers raises many kinds
                raise UserError(f"cannot read the tokenizer in {directory}: {_first_line(e)}") from None
        backend = getattr(source, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise UserError(f"{type(source).__name__} is not a fast (tokenizers-backed) Hugging Face tokenizer")
        max_length = getattr(source, "model_max_length", None)
        return cls(
            tokenizers.Tokenizer.from_str(backend.to_str()),  # a copy: later changes to `source` stay there
            eos_token=_token_text(getattr(source, "eos_token", None)),
            bos_token=_token_text(getattr(source, "bos_token", None)),
            chat_template=getattr(source, "chat_template", None) or None,
            model_max_length=max_length if isinstance(max_length, int) and max_length < 1 << 40 else None,
        )

    @classmethod
    def from_bpe_files(
        cls, vocab: str | Path, merges: str | Path, special_tokens: Sequence[str] = (DEFAULT_EOS,)
    ) -> Tokenizer:
        """GPT-2's byte-level BPE from its `vocab.json` (alias encoder.json) and `merges.txt` (alias vocab.bpe)."""
        for file in (vocab, merges):
            if not Path(file).is_file():
                raise UserError(f"no such BPE file: {file}")
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # the Rust side raises a bare Exception
            raise UserError(f"cannot read BPE files {vocab} and {merges}: {e}") from None
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(list(special_tokens))
        return cls(backend)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, eos_id={self.eos_id})"


def _write_atomic(file: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # encrypted while a writing key is set (lmforge.crypto)
            f.write(text.encode("utf-8") if crypto.active_writing_key() is None
                    else crypto.encrypt_bytes(text.encode("utf-8"), crypto.active_writing_key()))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes owner-only files
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_backend(file: Path) -> tokenizers.Tokenizer:
    try:
        text = bytes(crypto.read_bytes(file)).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{file} is not a tokenizer.json: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read tokenizer {file}: {e.strerror}") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{file} line {e.lineno}: not valid JSON ({e.msg})") from None
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception
        raise UserError(f"{file} is not a valid tokenizer.json ({e})") from None


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`, {} if there is no such file; bad JSON is a UserError naming the line."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(crypto.read_bytes(file))
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{file} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} must hold a JSON object")
    return value


def _token_text(token: Any) -> str | None:
    """A special token's text: tokenizer_config.json writes it as a string or as {"content": ..., ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return str(token) if token else None


def _read_metadata(directory: Path) -> dict[str, Any]:
    """eos/bos tokens, chat template and length from a directory's tokenizer_config.json (+ chat_template.jinja)."""
    config = _read_json(directory / TOKENIZER_CONFIG_FILE)
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (directory / CHAT_TEMPLATE_FILE).is_file():
        template = crypto.read_text(directory / CHAT_TEMPLATE_FILE)
    max_length = config.get("model_max_length")
    return {
        "eos_token": _token_text(config.get("eos_token")),
        "bos_token": _token_text(config.get("bos_token")),
        "chat_template": template if isinstance(template, str) and template else None,
        "model_max_length": max_length if isinstance(max_length, int) and max_length < 1 << 40 else None,
    }


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    """A chat template compiled in Jinja's immutable sandbox, with the helpers transformers gives templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    special_tokens: Sequence[str] = (DEFAULT_EOS,),
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`.

    `vocab_size` counts the 256 byte tokens, the merges and the special tokens; the result can be
    smaller when the text has too few distinct pairs seen `min_frequency` times. The first special
    token becomes the end-of-text token (`eos_id`); special tokens get the ids 0, 1, ...
    """
    special_tokens = list(special_tokens)
    if not special_tokens or not all(isinstance(t, str) and t for t in special_tokens):
        raise UserError(
            f"special_tokens must be a non-empty list of non-empty strings (the first is the "
            f"end-of-text token), got {special_tokens!r}"
        )
    if len(set(special_tokens)) != len(special_tokens):
        raise UserError(f"special_tokens has duplicates: {special_tokens!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise UserError(f"vocab_size must be an integer, got {vocab_size!r}")
    minimum = 256 + len(special_tokens) + 1
    if vocab_size < minimum:
        raise UserError(
            f"vocab_size {vocab_size} is too small: it must exceed 256 byte tokens + "
            f"{len(special_tokens)} special token(s), i.e. be at least {minimum}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise UserError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = [0]  # characters of text seen, to refuse training on nothing

    def counted(items: Iterable[str]) -> Iterator[str]:
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise UserError(f"train_tokenizer: text #{i} is a {type(text).__name__}, expected str")
            seen[0] += len(text)
            yield text

    backend.train_from_iterator(counted(texts), trainer=trainer)
    if seen[0] == 0:
        raise UserError("no text to train the tokenizer on (the texts are empty)")
    return Tokenizer(backend)



_PIECE_CHARS = 1 << 13  # small pieces keep every core busy; measured no slower than whole texts
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _pieces(text: str, size: int = _PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of about `size` characters that tokenize to the same ids as the whole.

    A cut goes just after a "\n" with non-space characters on both sides: GPT-2's pre-tokenizer
    regex always makes such a "\n" a word of its own, and BPE never merges across words.
    """
    pieces, start = [], 0
    while len(text) - start > 2 * size:
        match = _SAFE_CUT.search(text, start + size)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces
