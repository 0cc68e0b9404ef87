"""Encryption at rest: checkpoints and token shards stored as AES-256-GCM files, read back in memory only.

    lmforge keygen --out data.key                         # 32 random bytes, mode 0600 (or write a passphrase file)
    lmforge pretrain --data D --out runs/x --encrypt-key-file data.key    # every checkpoint file encrypted
    lmforge generate runs/x --key-file data.key           # any verb reads encrypted inputs (or LMFORGE_KEY_FILE)
    lmforge encrypt runs/x --key-file data.key --out runs/x-enc ; lmforge decrypt runs/x-enc --key-file ... --out D

    from lmforge import crypto
    key = crypto.load_key("data.key")
    with crypto.reading_key(key):                         # what lmforge.load(PATH, key=...) does
        data = crypto.read_bytes(path)                    # the plaintext, decrypted in memory

File format (version 1), all integers big-endian:

    header   magic "LMFCRYPT" (8) | version (1) | kdf (1: 0 data key, 1 scrypt) | chunk size (4) | key id (8)
             [scrypt only: salt (16) | log2 n (1) | r (1) | p (1)]
    chunks   nonce (12, random) | AES-256-GCM ciphertext of `chunk size` plaintext bytes (the last: fewer) | tag (16)

Every chunk's associated data is the header's bytes, the chunk's index (8) and a final-chunk flag (1):
a changed header byte, a changed, swapped or reordered chunk, a dropped last chunk (truncation) or a
wrong key fails authentication, and nothing is returned. The key id (a truncated, domain-separated
SHA-256 of the key, which does not reveal it) is checked first, for a clear "another key" message.

Keys: a key file made by `lmforge keygen` holds "lmforge-data-key-v1:" and 32 random bytes (base64);
any other key file holds a passphrase, turned into a key by scrypt with a random salt stored in each
file's header (one salt per writing process, so a checkpoint costs one scrypt, not one per file).

The process has a reading key and a writing key (`reading_key`, `writing_key`, or `set_...`); the
CLI sets them from `--key-file` / `LMFORGE_KEY_FILE` and `--encrypt-key-file`. `read_bytes(path)` is
the one reader: it decrypts an encrypted file with whichever of the two keys it was written with, and
returns a plain file as it is. `write_bytes(path, data)` and `open_writer(path)` encrypt while a
writing key is set. Nothing decrypted is ever written to a file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import mmap
import os
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lmforge.errors import UserError

MAGIC = b"LMFCRYPT"
VERSION = 1
KDF_DATA_KEY, KDF_SCRYPT = 0, 1
NONCE, TAG = 12, 16
DEFAULT_CHUNK = 4 << 20  # plaintext bytes per chunk: large files stream, a chunk's overhead (28 bytes) is nothing
MAX_CHUNK = 1 << 28
_FIXED = struct.Struct(">8sBBI8s")  # magic, version, kdf, chunk size, key id
_SCRYPT = struct.Struct(">16sBBB")  # salt, log2 n, r, p
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 15, 8, 1  # 32 MiB and ~0.1 s per derivation
SCRYPT_MAX_MEMORY = 256 << 20  # what a file's header may ask for (128 r n bytes)
DATA_KEY_PREFIX = "lmforge-data-key-v1:"
ENV_KEY_FILE = "LMFORGE_KEY_FILE"
KEY_FLAG = "--key-file"
_ID_LABEL = b"lmforge key id v1\0"


# ----------------------------------------------------------------------------------------------
# keys


@dataclass(eq=False)
class Key:
    """A key from a key file: a 32-byte data key, or a passphrase (a key per salt, by scrypt).

    Its repr names the file and never shows the secret."""

    secret: bytes = field(repr=False)
    passphrase: bool
    source: str = "a key"
    _derived: dict[tuple, bytes] = field(default_factory=dict, repr=False)
    _salt: bytes | None = field(default=None, repr=False)

    def derive(self, salt: bytes = b"", log2_n: int = 0, r: int = 0, p: int = 0) -> bytes:
        """The AES key: the data key itself, or scrypt(passphrase, salt, n, r, p), computed once per salt."""
        if not self.passphrase:
            return self.secret
        params = (salt, log2_n, r, p)
        if params not in self._derived:
            self._derived[params] = hashlib.scrypt(self.secret, salt=salt, n=1 << log2_n, r=r, p=p,
                                                   maxmem=SCRYPT_MAX_MEMORY + (1 << 20), dklen=32)
        return self._derived[params]

    def writing_salt(self) -> bytes:
        """The salt this key writes with: random, drawn once per process."""
        if self._salt is None:
            self._salt = secrets.token_bytes(16)
        return self._salt


def key_id(aes_key: bytes) -> bytes:
    """8 bytes that tell keys apart without revealing them (SHA-256 with its own label)."""
    return hashlib.sha256(_ID_LABEL + aes_key).digest()[:8]


def load_key(key: Key | str | Path) -> Key:
    """A Key from a key-file path (a data key from `lmforge keygen`, or a passphrase), or `key` itself."""
    if isinstance(key, Key):
        return key
    path = Path(key)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no such key file: {path} (make one with `lmforge keygen --out {path}`)") from None
    except OSError as e:
        raise UserError(f"cannot read key file {path}: {e.strerror}") from None
    text = raw.decode("utf-8", errors="strict") if raw.isascii() else None
    if text is not None and text.strip().startswith(DATA_KEY_PREFIX):
        try:
            secret = base64.urlsafe_b64decode(text.strip()[len(DATA_KEY_PREFIX):].encode())
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise UserError(f"{path} is a damaged data key file (expected {DATA_KEY_PREFIX} and 32 bytes in base64)")
        return Key(secret, passphrase=False, source=str(path))
    passphrase = raw.rstrip(b"\r\n")
    if not passphrase:
        raise UserError(f"key file {path} is empty (expected a data key from `lmforge keygen` or a passphrase)")
    return Key(passphrase, passphrase=True, source=str(path))


def keygen(out: str) -> Path:
    """Make a data key file for encryption at rest: 32 random bytes, readable only by you (mode 0600).

    Keep it apart from the data it protects: whoever has it can read the encrypted checkpoints and shards.
    A file holding anything else is read as a passphrase instead (scrypt turns it into a key).

    Args:
        out: the key file to create (never overwritten)
    """
    path = Path(out)
    text = DATA_KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"{path} already exists; a key file is never overwritten (choose another --out)") from None
    except OSError as e:
        raise UserError(f"cannot create key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# ----------------------------------------------------------------------------------------------
# the process's keys


_keys: dict[str, Key | None] = {"read": None, "write": None}
_env_key: dict[str, Key] = {}  # LMFORGE_KEY_FILE's key, by path, read once


def set_reading_key(key: Key | str | Path | None) -> None:
    """The key encrypted inputs are read with, for the whole process (None: LMFORGE_KEY_FILE's, if set)."""
    _keys["read"] = None if key is None else load_key(key)


def set_writing_key(key: Key | str | Path | None) -> None:
    """The key outputs are encrypted with while it is set (None: outputs are written plain)."""
    _keys["write"] = None if key is None else load_key(key)


@contextmanager
def reading_key(key: Key | str | Path | None) -> Iterator[Key | None]:
    """`set_reading_key(key)` for the block, then the key before."""
    before = _keys["read"]
    set_reading_key(key)
    try:
        yield _keys["read"]
    finally:
        _keys["read"] = before


@contextmanager
def writing_key(key: Key | str | Path | None) -> Iterator[Key | None]:
    """`set_writing_key(key)` for the block, then the key before."""
    before = _keys["write"]
    set_writing_key(key)
    try:
        yield _keys["write"]
    finally:
        _keys["write"] = before


def active_reading_key() -> Key | None:
    """The reading key: the one set, else LMFORGE_KEY_FILE's, else None."""
    if _keys["read"] is not None:
        return _keys["read"]
    env = os.environ.get(ENV_KEY_FILE)
    if not env:
        return None
    if env not in _env_key:
        _env_key[env] = load_key(env)
    return _env_key[env]


def active_writing_key() -> Key | None:
    return _keys["write"]


# ----------------------------------------------------------------------------------------------
# the format


@dataclass(frozen=True)
class Header:
    """A file's header: its bytes (every chunk's associated data) and what they say."""

    raw: bytes
    chunk_size: int
    key_id: bytes
    scrypt: tuple | None  # (salt, log2 n, r, p) where the key is a passphrase


def make_header(key: Key, chunk_size: int = DEFAULT_CHUNK) -> tuple[Header, bytes]:
    """A new file's header for `key` and the AES key it encrypts with."""
    if not 16 <= chunk_size <= MAX_CHUNK:
        raise UserError(f"chunk size {chunk_size} is out of range (16 bytes to {MAX_CHUNK >> 20} MiB)")
    scrypt = (key.writing_salt(), SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P) if key.passphrase else None
    aes_key = key.derive(*scrypt) if scrypt else key.derive()
    raw = _FIXED.pack(MAGIC, VERSION, KDF_SCRYPT if scrypt else KDF_DATA_KEY, chunk_size, key_id(aes_key))
    if scrypt:
        raw += _SCRYPT.pack(*scrypt)
    return Header(raw, chunk_size, key_id(aes_key), scrypt), aes_key


def read_header(f: BinaryIO, name: str) -> Header:
    """Parse the header at the start of `f`; a one-line UserError where it is not one lmforge can read."""
    fixed = f.read(_FIXED.size)
    if len(fixed) < _FIXED.size or not fixed.startswith(MAGIC):
        raise UserError(f"{name} is not an lmforge encrypted file (no {MAGIC.decode()} header)")
    _, version, kdf, chunk_size, kid = _FIXED.unpack(fixed)
    if version != VERSION:
        raise UserError(f"{name} is encrypted in format version {version}; this lmforge reads version {VERSION}")
    if kdf not in (KDF_DATA_KEY, KDF_SCRYPT) or not 16 <= chunk_size <= MAX_CHUNK:
        raise UserError(f"{name} has a damaged encryption header (key kind {kdf}, chunk size {chunk_size})")
    scrypt = None
    if kdf == KDF_SCRYPT:
        extra = f.read(_SCRYPT.size)
        if len(extra) < _SCRYPT.size:
            raise UserError(f"{name} is truncated inside its encryption header")
        scrypt = _SCRYPT.unpack(extra)
        if not (10 <= scrypt[1] <= 22 and 1 <= scrypt[2] <= 32 and 1 <= scrypt[3] <= 16
                and 128 * scrypt[2] << scrypt[1] <= SCRYPT_MAX_MEMORY):
            raise UserError(f"{name} has a damaged encryption header (scrypt log2 n={scrypt[1]}, r={scrypt[2]}, "
                            f"p={scrypt[3]})")
        fixed += extra
    return Header(fixed, chunk_size, kid, scrypt)


def _aad(header: Header, index: int, final: bool) -> bytes:
    return header.raw + struct.pack(">QB", index, final)


def is_encrypted(path: str | Path) -> bool:
    """Whether the file at `path` starts with lmforge's encryption header (False for a directory)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


# ----------------------------------------------------------------------------------------------
# encrypting


class EncryptingWriter(io.RawIOBase):
    """A binary file object that encrypts what is written to `sink`, chunk by chunk.

    The last chunk is held back until `close()`, which writes it with the final flag. Whole chunks of a
    large write are encrypted straight from the caller's buffer into one reused output buffer."""

    def __init__(self, sink: BinaryIO, key: Key, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.header, aes_key = make_header(key, chunk_size)
        self.sink, self.aead, self.index = sink, AESGCM(aes_key), 0
        self.pending = bytearray()  # at most one chunk, not yet known to be the last
        self.out = bytearray(NONCE + chunk_size + TAG)
        sink.write(self.header.raw)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written, size = len(view), self.header.chunk_size
        while view:
            if len(self.pending) == size:  # more data follows: the pending chunk is not the last
                self._emit(self.pending, final=False)
                self.pending.clear()
            if not self.pending and len(view) > size:  # a whole chunk with more after it: no copy
                self._emit(view[:size], final=False)
                view = view[size:]
                continue
            take = min(size - len(self.pending), len(view))
            self.pending += view[:take]
            view = view[take:]
        return written

    def _emit(self, chunk, final: bool) -> None:
        end = NONCE + len(chunk) + TAG
        out = memoryview(self.out)
        out[:NONCE] = os.urandom(NONCE)
        self.aead.encrypt_into(bytes(out[:NONCE]), chunk, _aad(self.header, self.index, final), out[NONCE:end])
        self.sink.write(out[:end])
        self.index += 1

    def close(self) -> None:
        if not self.closed:
            self._emit(self.pending, final=True)
            self.pending.clear()
            self.sink.flush()
        super().close()


def encrypt_bytes(data: bytes, key: Key, chunk_size: int = DEFAULT_CHUNK) -> bytes:
    """`data` in lmforge's encrypted format."""
    sink = io.BytesIO()
    with EncryptingWriter(sink, key, chunk_size) as writer:
        writer.write(data)
    return sink.getvalue()


def encrypt_file(source: str | Path, out: str | Path, key: Key, chunk_size: int = DEFAULT_CHUNK) -> None:
    """Encrypt the file `source` into a new file `out`, streaming chunk by chunk."""
    with open(source, "rb") as f, open(out, "xb") as sink, EncryptingWriter(sink, key, chunk_size) as writer:
        while block := f.read(8 * chunk_size):  # several chunks a read: all but the last go without a copy
            writer.write(block)


@contextmanager
def open_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A new binary file at `path`: encrypting while a writing key is set, plain otherwise."""
    key = active_writing_key()
    with open(path, "wb") as f:
        if key is None:
            yield f
        else:
            with EncryptingWriter(f, key) as writer:
                yield writer


def write_bytes(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path`, encrypted while a writing key is set."""
    with open_writer(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


# ----------------------------------------------------------------------------------------------
# decrypting


def _key_for(header: Header, name: str, keys: list[Key]) -> bytes:
    """The AES key among `keys` that `header` was written with; a one-line UserError where none is."""
    if not keys:
        raise UserError(f"{name} is encrypted; pass {KEY_FLAG} FILE (or set {ENV_KEY_FILE}) with its key")
    for key in keys:
        if (header.scrypt is not None) != key.passphrase:
            continue
        aes_key = key.derive(*header.scrypt) if header.scrypt else key.derive()
        if hmac.compare_digest(key_id(aes_key), header.key_id):
            return aes_key
    key = keys[0]
    if header.scrypt and key.passphrase:
        raise UserError(f"{name} cannot be decrypted with the passphrase in {key.source} (wrong passphrase)")
    kind = "a passphrase" if header.scrypt else f"another key (id {header.key_id.hex()})"
    raise UserError(f"{name} was encrypted with {kind}, not with {key.source}; pass its key with {KEY_FLAG}")


def _keys_to_try(key: Key | None) -> list[Key]:
    if key is not None:
        return [key]
    return [k for k in dict.fromkeys([active_reading_key(), active_writing_key()]) if k is not None]


def decrypt_stream(f: BinaryIO, size: int, name: str, key: Key | None = None,
                   into: bytearray | mmap.mmap | None = None) -> Iterator[memoryview]:
    """The plaintext chunks of the encrypted file `f` of `size` bytes, each authenticated before it is
    yielded (a damaged chunk stops the stream with a UserError; callers keep nothing of a failed read).

    `into`: a buffer of the whole plaintext's size that the chunks are decrypted into, in place."""
    header = read_header(f, name)
    aead = AESGCM(_key_for(header, name, _keys_to_try(key)))
    stored = header.chunk_size + NONCE + TAG
    body = size - len(header.raw)
    count = max(1, -(-body // stored))
    last = body - (count - 1) * stored
    if last < NONCE + TAG:
        raise UserError(f"{name} is truncated (its last encrypted chunk is incomplete)")
    buffer = bytearray(min(stored, body))
    out = memoryview(into) if into is not None else memoryview(bytearray(len(buffer) - NONCE - TAG))
    for index in range(count):
        length = stored if index < count - 1 else last
        view = memoryview(buffer)[:length]
        if f.readinto(view) != length:
            raise UserError(f"{name} changed while it was read")
        start = index * header.chunk_size if into is not None else 0
        plain = out[start:start + length - NONCE - TAG]
        try:
            aead.decrypt_into(bytes(view[:NONCE]), view[NONCE:], _aad(header, index, index == count - 1), plain)
        except InvalidTag:
            raise UserError(f"{name} fails authentication at chunk {index} of {count} (changed, truncated or "
                            f"reordered since it was encrypted, or not this key's file); nothing was read") from None
        yield plain


def plaintext_size(path: Path) -> int:
    """The decrypted size of the encrypted file at `path` (from its size and header alone)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = read_header(f, str(path))
    body = size - len(header.raw)
    count = max(1, -(-body // (header.chunk_size + NONCE + TAG)))
    return max(0, body - count * (NONCE + TAG))


def seal(path: str | Path) -> str:
    """A digest of the encrypted file's header and of every chunk's nonce and tag: what identifies its
    ciphertext, at the cost of a few bytes read per chunk. Chunks are authenticated against their tags
    when read, so a file that matches a recorded seal decrypts to the recorded contents or not at all."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = read_header(f, str(path))
        digest.update(header.raw)
        stored = header.chunk_size + NONCE + TAG
        at = len(header.raw)
        while at < size:
            end = min(at + stored, size)
            f.seek(at)
            digest.update(f.read(NONCE))
            f.seek(max(at, end - TAG))
            digest.update(f.read(TAG))
            at = end
    return digest.hexdigest()


def content_size(path: str | Path) -> int:
    """The size of the file's contents: decrypted where it is encrypted."""
    path = Path(path)
    return plaintext_size(path) if is_encrypted(path) else path.stat().st_size


def iter_content(path: str | Path, block: int = 1 << 20) -> Iterator[bytes | memoryview]:
    """The file's contents block by block, decrypted (and authenticated) where it is encrypted; nothing
    is kept in memory but the current block (for hashing a large file)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) == MAGIC:
            f.seek(0)
            yield from decrypt_stream(f, os.fstat(f.fileno()).st_size, str(path))
            return
        f.seek(0)
        while data := f.read(block):
            yield data


def _plaintext_buffer(size: int) -> bytearray | mmap.mmap:
    """A writable buffer of `size` bytes: a large one mapped with its pages populated at once (Linux's
    MAP_POPULATE: a third faster than faulting 4 KiB pages in one by one as the chunks are decrypted)."""
    if size < 16 << 20 or not hasattr(mmap, "MAP_POPULATE"):
        return bytearray(size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def read_bytes(path: str | Path, key: Key | None = None) -> bytes | bytearray | mmap.mmap:
    """The contents of the file at `path`: decrypted in memory where it is encrypted (with `key`, or the
    process's reading or writing key), as they are where it is plain. A large decrypted file comes as a
    writable anonymous `mmap` (bytes-like: torch.frombuffer, np.frombuffer and bytes() take it)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            f.seek(0)
            return f.read()
        f.seek(0)
        data = _plaintext_buffer(plaintext_size(path))  # one buffer, each chunk decrypted into its place
        for _ in decrypt_stream(f, os.fstat(f.fileno()).st_size, str(path), key, into=data):
            pass
    return data


def read_text(path: str | Path) -> str:
    """`read_bytes(path)` as UTF-8 text; a one-line UserError where it is not."""
    try:
        return bytes(read_bytes(path)).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None


def decrypt_file(source: str | Path, out: str | Path, key: Key) -> None:
    """Decrypt the encrypted file `source` into a new file `out`; a damaged file leaves no `out` behind."""
    source, out = Path(source), Path(out)
    try:
        with open(source, "rb") as f, open(out, "xb") as sink:
            for chunk in decrypt_stream(f, os.fstat(f.fileno()).st_size, str(source), key):
                sink.write(chunk)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# the verbs: files and directories


def _pairs(source: Path, out: Path) -> list[tuple[Path, Path]]:
    if not source.exists():
        raise UserError(f"no such file or directory: {source}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose a new --out (nothing was written)")
    if source.is_file():
        return [(source, out)]
    return [(p, out / p.relative_to(source)) for p in sorted(source.rglob("*")) if p.is_file()]


def _transform(path: str, key_file: str, out: str, encrypting: bool, chunk_size: int = DEFAULT_CHUNK) -> Path:
    source, target = Path(path), Path(out)
    key = load_key(key_file)
    pairs = _pairs(source, target)
    for file, _ in pairs:  # every file checked before anything is written
        if is_encrypted(file) == encrypting:
            state = "already encrypted" if encrypting else "not encrypted"
            raise UserError(f"{file} is {state}; expected {'a plain' if encrypting else 'an encrypted'} file "
                            f"(nothing was written)")
    if not encrypting:  # a wrong key is found before anything is written
        for file, _ in pairs:
            with open(file, "rb") as f:
                _key_for(read_header(f, str(file)), str(file), [key])
    made = [target] if source.is_dir() and not target.exists() else []
    try:
        for file, dest in pairs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            encrypt_file(file, dest, key, chunk_size) if encrypting else decrypt_file(file, dest, key)
            made.append(dest)
    except BaseException:
        for p in reversed(made):
            p.unlink(missing_ok=True) if p.is_file() else _remove_tree(p)
        raise
    return target


def _remove_tree(directory: Path) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def encrypt(path: str, key_file: str, out: str, chunk_kib: int = DEFAULT_CHUNK >> 10) -> Path:
    """Encrypt a file or a directory (a checkpoint, a run, token shards) with AES-256-GCM, file by file.

    A directory keeps its layout; every file in it is encrypted. Read the result with --key-file (or
    LMFORGE_KEY_FILE) on any verb, `lmforge.load(PATH, key=...)`, or `lmforge decrypt`.

    Args:
        path: the file or directory to encrypt (it is left as it is)
        key_file: a data key file (`lmforge keygen`) or a file holding a passphrase
        out: the encrypted copy to create (a new file or directory)
        chunk_kib: plaintext bytes per encrypted chunk, in KiB
    """
    return _transform(path, key_file, out, encrypting=True, chunk_size=chunk_kib << 10)


def decrypt(path: str, key_file: str, out: str) -> Path:
    """Decrypt a file or directory made by `lmforge encrypt` (or written with --encrypt-key-file).

    Every chunk is authenticated: a changed, truncated or reordered file, or a wrong key, is an error and
    leaves nothing behind.

    Args:
        path: the encrypted file or directory
        key_file: the key file it was encrypted with (a data key or a passphrase)
        out: the plain copy to create (a new file or directory)
    """
    return _transform(path, key_file, out, encrypting=False)
