"""Byte-level BPE tokenizers on Hugging Face `tokenizers`.

Train one on your own text, save it as a single `tokenizer.json`, load it back:

    tok = train_tokenizer(texts, vocab_size=8192)
    ids = tok.encode("To be, or not to be")
    assert tok.decode(ids) == "To be, or not to be"
    tok.save("runs/tok")                      # writes runs/tok/tokenizer.json
    tok = Tokenizer.load("runs/tok")

Text is split into bytes before merging (GPT-2 style), so every UTF-8 string round-trips exactly:
`decode(encode(s)) == s` for any language, emoji, tabs, "\\r\\n" or runs of spaces. The special tokens
live in the tokenizer.json as added special tokens; the first one (lowest id) is the end-of-text
token that separates documents (`eos_id`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_EOS = "<|endoftext|>"


class Tokenizer:
    """A text <-> token-id mapping with special tokens; `backend` is the raw `tokenizers.Tokenizer`."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self.backend = backend
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens: list[str] = [added[i].content for i in sorted(added) if added[i].special]
        if not self.special_tokens:
            raise UserError(
                "tokenizer has no special tokens; expected an end-of-text token such as "
                f"{DEFAULT_EOS!r} as its first added special token"
            )
        eos_id = backend.token_to_id(self.special_tokens[0])
        assert eos_id is not None
        self.eos_id: int = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the model's embedding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str:
        """The end-of-text token's string, e.g. "<|endoftext|>"."""
        return self.special_tokens[0]

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

        The write is atomic (temp file + rename). Returns the file written.
        """
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding tokenizer.json, or from the json file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            if path.is_dir():
                raise UserError(f"no {TOKENIZER_FILE} in {path}; expected a tokenizer saved by lmforge")
            raise UserError(f"no such tokenizer file or directory: {path}")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{file} is not a tokenizer.json: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise UserError(f"cannot read tokenizer {file}: {e.strerror}") from None
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{file} line {e.lineno}: not valid JSON ({e.msg})") from None
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception
            raise UserError(f"{file} is not a valid tokenizer.json ({e})") from None
        try:
            return cls(backend)
        except UserError as e:
            raise UserError(f"{file}: {e}") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, eos_id={self.eos_id})"


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
