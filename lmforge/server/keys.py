"""API keys for `lmforge serve`: the keys file, checking a token, per-key rate limits.

    lmforge keys create --keys keys.json --name alice --scopes chat,completions [--models M,...] [--rpm 60]
                        [--tpm 20000] [--expires 2027-01-31]      # prints the token, once
    lmforge keys list --keys keys.json ; lmforge keys revoke --keys keys.json alice

A token reads `lmf-<key_id>-<secret>`: `key_id` is 8 random hex digits, stored in the file to find the
key's record in one look-up; `secret` is `secrets.token_urlsafe(32)`, 256 random bits, never stored.

The keys file is JSON, written only by `create_key` / `revoke_key`:

    {"format": "lmforge-keys", "version": 1, "keys": [
      {"name": "alice", "id": "3f9c01ab", "salt": "<32 hex>", "hash": "<64 hex: sha256(salt || secret)>",
       "scopes": ["chat"], "models": null, "rpm": 60, "tpm": null,
       "expires": "2027-02-01T00:00:00+00:00", "created": "2026-12-01T10:00:00+00:00"}]}

`models: null` means every model, `rpm`/`tpm: null` no limit, `expires: null` never (else the first
instant, UTC, at which the key no longer works). Revoking a key removes its record.

Security choices:
- The file holds a per-key random salt and sha256(salt || secret), never the secret: whoever reads
  the file cannot use a key. A fast hash is enough here because the secret is 256 random bits: no
  guess list exists to try, and brute force of 2**256 is out of reach at any hashing speed. Slow
  KDFs (scrypt, argon2) exist for low-entropy passwords people choose; they would only add
  milliseconds of CPU to every request. The salt keeps equal digests from revealing equal secrets.
- Digests are compared with `hmac.compare_digest` (constant time), and a token whose key_id is
  unknown is compared against a dummy digest, so timing tells neither the secret nor which ids exist.
- The file is created with mode 0600 and replaced atomically (a 0600 temporary file in the same
  folder, then `os.replace`), so a server reading it never sees half a file and it stays 0600.
- Tokens are never logged or printed, except once by `lmforge keys create`.
- A running `KeyStore` re-reads the file when it changes (checked at most once a second), so
  `keys create` / `keys revoke` take effect without a restart; a damaged file keeps the last good keys.

This module imports only the standard library (the CLI starts fast).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

SCOPES = ("chat", "completions", "embeddings", "classify", "admin")
FORMAT, VERSION = "lmforge-keys", 1
WINDOW = 60.0  # seconds of the rate limits' sliding window
TOKEN = re.compile(r"lmf-([0-9a-f]{8})-([A-Za-z0-9_-]{43})")  # token_urlsafe(32) is 43 characters
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # names go into tables and the server's logs
log = logging.getLogger("lmforge.server")


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


_DUMMY_SALT = secrets.token_hex(16)
_DUMMY_HASH = _digest(_DUMMY_SALT, secrets.token_urlsafe(32))


@dataclass(frozen=True)
class Key:
    """One key's record as the server uses it (never the secret, nor its hash)."""

    name: str
    key_id: str
    scopes: frozenset[str]
    models: tuple[str, ...] | None  # None: every model
    rpm: int | None  # requests per minute; None: no limit
    tpm: int | None  # tokens per minute; None: no limit
    expires: datetime | None  # aware, UTC: the first instant the key no longer works
    created: datetime

    def allows_scope(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires is None:
            return False
        now = now or datetime.now(timezone.utc)
        return (now if now.tzinfo else now.replace(tzinfo=timezone.utc)) >= self.expires


# ----------------------------------------------------------------------------------------------
# the file


def _parse_time(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not an ISO date and time") from None
    if moment.tzinfo is None:
        raise UserError(f"{where}: {value!r} has no timezone")
    return moment.astimezone(timezone.utc)


def _check_record(record: Any, where: str) -> Key:
    """The Key of one record of the file; a UserError naming what is wrong."""
    fields = ("name", "id", "salt", "hash", "scopes", "models", "rpm", "tpm", "expires", "created")
    if not isinstance(record, dict) or set(fields) - set(record):
        missing = sorted(set(fields) - set(record)) if isinstance(record, dict) else []
        raise UserError(f"{where}: " + (f"missing {', '.join(missing)}" if missing else "not a JSON object"))
    r = record
    hex_of = {"id": 8, "salt": 32, "hash": 64}
    checks = {
        "name": isinstance(r["name"], str) and NAME.fullmatch(r["name"]),
        **{f: isinstance(r[f], str) and re.fullmatch(f"[0-9a-f]{{{n}}}", r[f]) for f, n in hex_of.items()},
        "scopes": isinstance(r["scopes"], list) and r["scopes"] and all(s in SCOPES for s in r["scopes"]),
        "models": r["models"] is None or isinstance(r["models"], list) and r["models"]
        and all(isinstance(m, str) and m for m in r["models"]),
        **{f: r[f] is None or type(r[f]) is int and r[f] >= 1 for f in ("rpm", "tpm")},
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise UserError(f"{where}: bad {bad[0]} {r[bad[0]]!r}" if bad[0] not in ("salt", "hash")
                        else f"{where}: bad {bad[0]}")  # never echo a digest
    created = _parse_time(r["created"], f"{where}: created")
    if created is None:
        raise UserError(f"{where}: created is null")
    return Key(r["name"], r["id"], frozenset(r["scopes"]),
               None if r["models"] is None else tuple(r["models"]), r["rpm"], r["tpm"],
               _parse_time(r["expires"], f"{where}: expires"), created)


def _read(path: Path) -> tuple[list[dict[str, Any]], list[Key]]:
    """The records of a keys file and their Keys; a one-line UserError if it is missing or damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such keys file (create one with `lmforge keys create --keys {path} "
                        f"--name NAME --scopes chat`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the keys file ({e.__class__.__name__}: {e})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a keys file (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path}: not a keys file (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise UserError(f"{path}: keys file version {doc.get('version')!r}; this lmforge reads version {VERSION}")
    if not isinstance(doc.get("keys"), list):
        raise UserError(f"{path}: damaged keys file (\"keys\" is not a list)")
    keys = [_check_record(r, f"{path}: key #{i + 1}") for i, r in enumerate(doc["keys"])]
    for attr in ("name", "key_id"):
        values = [getattr(k, attr) for k in keys]
        if len(set(values)) < len(values):
            raise UserError(f"{path}: damaged keys file (two keys have the same {attr})")
    return doc["keys"], keys


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace the keys file atomically by a 0600 file holding `records`."""
    text = json.dumps({"format": FORMAT, "version": VERSION, "keys": records}, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.chmod(tmp, 0o600)  # whatever the umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _split(values: str | Sequence[str]) -> list[str]:
    """`chat,completions` or ["chat", "completions"] as a list, blanks dropped."""
    items = values.split(",") if isinstance(values, str) else [v for value in values for v in value.split(",")]
    return [item.strip() for item in items if item.strip()]


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """When a key given `--expires TEXT` stops working, in UTC: a date (2027-01-31) means through the end
    of that day UTC; a datetime without a timezone is UTC. A UserError if that is not after `now`."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            expires = datetime.fromisoformat(text).replace(tzinfo=timezone.utc) + timedelta(days=1)
        else:
            expires = datetime.fromisoformat(text)
            expires = (expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except ValueError:
        raise UserError(f"--expires {text!r}: not an ISO date (2027-01-31) or datetime (2027-01-31T18:00)") from None
    if expires <= (now or datetime.now(timezone.utc)):
        raise UserError(f"--expires {text!r} is in the past")
    return expires


def create_key(path: str | Path, name: str, scopes: Sequence[str], models: Sequence[str] | None = None,
               rpm: int | None = None, tpm: int | None = None, expires: str | None = None) -> str:
    """Add a key named `name` to the keys file `path` (created, mode 0600, if missing); returns its token,
    which is stored nowhere: only its salted hash is."""
    path = Path(path)
    records, keys = _read(path) if path.exists() else ([], [])  # refuses a file that is not a keys file
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"key name {name!r}: use 1 to 64 letters, digits and . _ @ -, starting with a letter "
                        f"or digit")
    if any(k.name == name for k in keys):
        raise UserError(f"{path} already has a key named {name!r}; revoke it first or choose another name")
    scope_list = _split(scopes)
    if not scope_list:
        raise UserError(f"no scopes given; choose from {', '.join(SCOPES)}")
    unknown = [s for s in scope_list if s not in SCOPES]
    if unknown:
        raise UserError(f"unknown scope {unknown[0]!r}; choose from {', '.join(SCOPES)}")
    model_list = None if models is None else _split(models)
    if model_list == []:
        raise UserError("--models names no model; leave it out to allow every model")
    for flag, limit in (("--rpm", rpm), ("--tpm", tpm)):
        if limit is not None and (type(limit) is not int or limit < 1):
            raise UserError(f"{flag} {limit}: must be a whole number >= 1 (leave it out for no limit)")
    expiry = parse_expiry(expires) if expires is not None else None
    taken = {k.key_id for k in keys}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
    records.append({
        "name": name, "id": key_id, "salt": salt, "hash": _digest(salt, secret),
        "scopes": [s for s in SCOPES if s in scope_list], "models": None if model_list is None else list(
            dict.fromkeys(model_list)), "rpm": rpm, "tpm": tpm,
        "expires": expiry.isoformat() if expiry else None,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat()})
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, records)
    return f"lmf-{key_id}-{secret}"


def list_keys(path: str | Path) -> list[Key]:
    """The keys of the keys file `path`, in the order they were created."""
    return _read(Path(path))[1]


def revoke_key(path: str | Path, name: str) -> Key:
    """Remove the key named `name` from the keys file `path`; returns its record."""
    path = Path(path)
    records, keys = _read(path)
    index = next((i for i, k in enumerate(keys) if k.name == name), None)
    if index is None:
        known = ", ".join(k.name for k in keys) or "none"
        raise UserError(f"{path} has no key named {name!r} (its keys: {known})")
    del records[index]
    _write(path, records)
    return keys[index]


# ----------------------------------------------------------------------------------------------
# the server's side


class KeyStore:
    """The keys of a keys file, for checking tokens; re-reads the file when it changed (looked at no more
    often than every `check_every` seconds), keeping the last good keys if it finds it damaged."""

    def __init__(self, path: str | Path, check_every: float = 1.0) -> None:
        self.path = Path(path)
        self.check_every = check_every
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._keys = self._load()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> dict[str, tuple[Key, str, str]]:
        records, keys = _read(self.path)
        return {k.key_id: (k, r["salt"], r["hash"]) for r, k in zip(records, keys)}

    def refresh(self) -> None:
        """Re-read the file now if it changed since the last read."""
        with self._lock:
            self._checked = time.monotonic()
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp  # a damaged file is reported once, not at every check
            try:
                self._keys = self._load()
            except UserError as e:
                log.warning("keys file not reloaded, keeping the %d keys read before: %s", len(self._keys), e)

    def authenticate(self, token: str) -> Key | None:
        """The Key of `token`; None for an unknown, malformed, wrong, revoked or expired token."""
        if time.monotonic() - self._checked >= self.check_every:
            self.refresh()
        match = TOKEN.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            return None
        key_id, secret = match.groups()
        key, salt, digest = self._keys.get(key_id, (None, _DUMMY_SALT, _DUMMY_HASH))
        if not hmac.compare_digest(_digest(salt, secret), digest) or key is None or key.expired():
            return None
        return key

    def __len__(self) -> int:
        return len(self._keys)


class RateLimiter:
    """Requests and tokens per key name over a sliding window of 60 seconds, in memory, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}

    def admit(self, key: Key, now: float | None = None) -> float | None:
        """None, recording the request, if `key` is under its limits; else the seconds until it will be."""
        now = time.monotonic() if now is None else now
        with self._lock:
            requests = self._requests.setdefault(key.name, deque())
            while requests and requests[0] <= now - WINDOW:
                requests.popleft()
            tokens = self._tokens.setdefault(key.name, deque())
            while tokens and tokens[0][0] <= now - WINDOW:
                tokens.popleft()
            waits = []
            if key.rpm is not None and len(requests) >= key.rpm:  # wait until enough of them leave the window
                waits.append(requests[len(requests) - key.rpm] + WINDOW - now)
            left = sum(n for _, n in tokens)
            if key.tpm is not None and left >= key.tpm:
                for t, n in tokens:
                    left -= n
                    if left < key.tpm:
                        waits.append(t + WINDOW - now)
                        break
            if waits:
                return max(waits)
            if key.rpm is not None:
                requests.append(now)
            return None

    def record_tokens(self, key: Key, tokens: int, now: float | None = None) -> None:
        """Count `tokens` (prompt and generated) against `key`'s tokens per minute."""
        if key.tpm is None or tokens <= 0:
            return
        with self._lock:
            self._tokens.setdefault(key.name, deque()).append((time.monotonic() if now is None else now, tokens))


# ----------------------------------------------------------------------------------------------
# the verbs


def print_created_key(keys: str, name: str, scopes: str, models: str | None = None, rpm: int | None = None,
                      tpm: int | None = None, expires: str | None = None) -> None:
    """Create an API key for `lmforge serve` and print its token (shown this once only).

    The token goes to stdout (`TOKEN=$(lmforge keys create ...)`); the keys file keeps only a salted
    hash of it. The file is created with mode 0600 if missing; a running server sees the new key
    within a second.

    Args:
        keys: the keys file (JSON, created if missing)
        name: the key's name, unique in the file (who or what uses it: alice, ci-bot)
        scopes: comma-separated: chat, completions, embeddings, classify, admin (admin allows every scope)
        models: comma-separated model names the key may use (default: every model)
        rpm: at most this many requests per minute (default: no limit)
        tpm: at most this many tokens (prompt + generated) per minute (default: no limit)
        expires: the last day the key works (2027-01-31: through its end, UTC) or an ISO datetime
            (2027-01-31T18:00, UTC unless a timezone is given) (default: never)
    """
    token = create_key(keys, name, scopes, None if models is None else _split(models), rpm, tpm, expires)
    print(token)
    sys.stdout.flush()
    print(f"created key {name!r}: the token above is shown only this once; {keys} keeps only its salted hash",
          file=sys.stderr)


def _when(moment: datetime | None) -> str:
    return "never" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def print_keys(keys: str) -> None:
    """List the API keys of a keys file: name, id, scopes, models, limits, expiry (never tokens or hashes).

    Args:
        keys: the keys file
    """
    found = list_keys(keys)
    if not found:
        print(f"no keys in {keys}")
        return
    now = datetime.now(timezone.utc)
    rows = [("NAME", "ID", "SCOPES", "MODELS", "RPM", "TPM", "EXPIRES", "CREATED")]
    rows += [(k.name, k.key_id, ",".join(s for s in SCOPES if s in k.scopes),
              "all" if k.models is None else ",".join(k.models), str(k.rpm or "-"), str(k.tpm or "-"),
              _when(k.expires) + (" (expired)" if k.expired(now) else ""), _when(k.created)) for k in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def print_revoked(keys: str, name: str) -> None:
    """Revoke an API key: remove it from the keys file (a running server refuses it within a second).

    Args:
        keys: the keys file
        name: the name of the key to revoke
    """
    key = revoke_key(keys, name)
    print(f"revoked key {key.name!r} (id {key.key_id}) in {keys}")
