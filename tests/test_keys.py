"""API keys (lmforge.server.keys): the keys file, tokens, reload in a running server, rate limits, the CLI."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.server.keys import SCOPES, Key, KeyStore, RateLimiter, create_key, list_keys, revoke_key

UTC = timezone.utc


def run(capsys, *args: str) -> tuple[int, str, str]:
    """`lmforge ARGS` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, *args: str) -> str:
    """The one stderr line of `lmforge ARGS`, which must exit with 2."""
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_a_created_key_authenticates_and_nothing_else_does(tmp_path):
    path = tmp_path / "keys.json"
    token = create_key(path, "alice", ["chat", "completions"], models=["m1"], rpm=10, tpm=1000)
    key = KeyStore(path).authenticate(token)
    assert isinstance(key, Key) and key.name == "alice" and key.scopes == {"chat", "completions"}
    assert key.models == ("m1",) and key.rpm == 10 and key.tpm == 1000 and key.expires is None
    assert key.created.tzinfo is not None and token == f"lmf-{key.key_id}-{token.split('-', 2)[2]}"

    store = KeyStore(path)
    prefix, key_id, secret = token.split("-", 2)
    other = create_key(tmp_path / "other.json", "bob", ["chat"])
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in [f"lmf-{key_id}-{flipped}",                      # right id, wrong secret
                f"lmf-{other.split('-', 2)[1]}-{secret}",       # unknown id
                f"lmf-{key_id}-{other.split('-', 2)[2]}",       # another key's secret
                "", "lmf-", token[:-1], token + "x", token.upper(), " " + token, f"lmf-{key_id}",
                f"sk-{key_id}-{secret}", f"lmf-{key_id.upper()}-{secret}", "lmf-zzzzzzzz-" + secret, None, 12]:
        assert store.authenticate(bad) is None, bad
    assert store.authenticate(token) == key and len(store) == 1


def test_the_file_holds_no_token_is_0600_and_salts_differ(tmp_path):
    path = tmp_path / "keys.json"
    tokens = [create_key(path, name, ["chat"]) for name in ("a", "b")]
    data = path.read_bytes()
    for token in tokens:
        secret = token.split("-", 2)[2]
        assert secret.encode() not in data and token.encode() not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    records = json.loads(data)["keys"]
    assert records[0]["salt"] != records[1]["salt"] and records[0]["hash"] != records[1]["hash"]
    assert json.loads(data)["format"] == "lmforge-keys" and json.loads(data)["version"] == 1
    os.chmod(path, 0o644)  # a file loosened by hand is 0600 again after the next write
    revoke_key(path, "a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temporary file left behind


def test_revoked_and_expired_keys_are_refused(tmp_path):
    path = tmp_path / "keys.json"
    token = create_key(path, "alice", ["chat"])
    dated = create_key(path, "dated", ["chat"], expires="2999-01-31")
    revoke_key(path, "alice")
    store = KeyStore(path)
    assert store.authenticate(token) is None and len(store) == 1

    key = store.authenticate(dated)  # a date works through the end of that day, UTC
    assert key.expires == datetime(2999, 2, 1, tzinfo=UTC)
    assert not key.expired(datetime(2999, 1, 31, 23, 59, 59, tzinfo=UTC))
    assert key.expired(datetime(2999, 2, 1, tzinfo=UTC)) and not key.expired()

    later = create_key(path, "later", ["chat"], expires="2999-01-31T18:00+02:00")
    assert KeyStore(path).authenticate(later).expires == datetime(2999, 1, 31, 16, tzinfo=UTC)
    naive = create_key(path, "naive", ["chat"], expires="2999-01-31T18:00")
    assert KeyStore(path).authenticate(naive).expires == datetime(2999, 1, 31, 18, tzinfo=UTC)

    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    edit(path, lambda doc: doc["keys"][0].update(expires=past))  # "dated", expired in the file
    assert KeyStore(path).authenticate(dated) is None


def test_scopes_and_models():
    def key(scopes, models=None):
        return Key("k", "0" * 8, frozenset(scopes), models, None, None, None, datetime.now(UTC))

    assert key(["chat"]).allows_scope("chat") and not key(["chat"]).allows_scope("embeddings")
    assert not key(["chat"]).allows_scope("admin")
    assert all(key(["admin"]).allows_scope(s) for s in SCOPES)
    assert key(["chat"]).allows_model("anything")
    assert key(["chat"], ("a", "b")).allows_model("b") and not key(["chat"], ("a",)).allows_model("b")


def test_a_running_store_sees_create_and_revoke_without_restart(tmp_path, capsys):
    path = tmp_path / "keys.json"
    first = create_key(path, "first", ["chat"])
    store = KeyStore(path, check_every=0)
    slow = KeyStore(path, check_every=3600)  # the throttle: no look at the file before check_every passed
    assert store.authenticate(first).name == "first"

    code, out, _ = run(capsys, "keys", "create", "--keys", str(path), "--name", "second", "--scopes", "chat")
    assert code == 0
    second = out.strip()
    assert run(capsys, "keys", "revoke", "--keys", str(path), "first")[0] == 0
    assert store.authenticate(second).name == "second" and store.authenticate(first) is None and len(store) == 1

    assert slow.authenticate(first) is not None and slow.authenticate(second) is None
    slow.refresh()
    assert slow.authenticate(first) is None and slow.authenticate(second).name == "second"


def test_a_reload_that_finds_a_damaged_file_keeps_the_last_good_keys(tmp_path, caplog):
    path = tmp_path / "keys.json"
    token = create_key(path, "alice", ["chat"])
    store = KeyStore(path, check_every=0)
    path.write_text('{"format": "lmforge-keys", "version": 1, "keys": [{"name": "alice"')
    with caplog.at_level(logging.WARNING, logger="lmforge.server"):
        assert store.authenticate(token).name == "alice"
        assert store.authenticate(token).name == "alice"  # the same damage is reported once
    warnings = [r for r in caplog.records if r.name == "lmforge.server"]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert token.split("-", 2)[2] not in caplog.text
    path.unlink()  # a vanished file keeps the keys too
    assert store.authenticate(token) is not None


@pytest.mark.parametrize("content, fragment", [
    ("", "not JSON"),
    ("{not json", "not JSON"),
    ('{"name": "my notes"}', "not a keys file"),
    ('{"format": "lmforge-keys", "version": 9, "keys": []}', "version 9"),
    ('{"format": "lmforge-keys", "version": 1, "keys": {}}', "not a list"),
    ('{"format": "lmforge-keys", "version": 1, "keys": [{"name": "a"}]}', "missing"),
])
def test_a_damaged_file_is_a_one_line_error(content, fragment, tmp_path, capsys):
    path = tmp_path / "keys.json"
    path.write_text(content)
    for read in (KeyStore, list_keys):
        with pytest.raises(UserError, match=fragment) as e:
            read(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    err = user_error(capsys, "keys", "list", "--keys", str(path))
    assert str(path) in err and fragment in err
    err = user_error(capsys, "keys", "create", "--keys", str(path), "--name", "x", "--scopes", "chat")
    assert path.read_text() == content  # never overwritten


def test_altered_records_are_refused(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "alice", ["chat"])
    good = path.read_text()
    for change, fragment in [(lambda d: d["keys"][0].update(scopes=["root"]), "bad scopes"),
                             (lambda d: d["keys"][0].update(hash="xyz"), "bad hash"),
                             (lambda d: d["keys"][0].update(rpm=0), "bad rpm"),
                             (lambda d: d["keys"][0].update(expires="soon"), "expires"),
                             (lambda d: d["keys"][0].pop("salt"), "missing salt"),
                             (lambda d: d["keys"].append(d["keys"][0]), "same name")]:
        path.write_text(good)
        edit(path, change)
        with pytest.raises(UserError, match=fragment):
            KeyStore(path)
    path.unlink()
    with pytest.raises(UserError, match="no such keys file"):
        KeyStore(path)


def test_rate_limits_per_minute():
    limiter = RateLimiter()
    key = Key("k", "0" * 8, frozenset({"chat"}), None, 2, None, None, datetime.now(UTC))
    assert limiter.admit(key, now=100.0) is None and limiter.admit(key, now=110.0) is None
    wait = limiter.admit(key, now=120.0)
    assert wait == pytest.approx(40.0) and 0 < wait <= 60
    assert limiter.admit(key, now=159.9) is not None
    assert limiter.admit(key, now=160.0) is None  # the first request left the window
    other = Key("other", "1" * 8, frozenset({"chat"}), None, 2, None, None, datetime.now(UTC))
    assert limiter.admit(other, now=160.0) is None  # limits are per key

    tokens = Key("t", "2" * 8, frozenset({"chat"}), None, None, 100, None, datetime.now(UTC))
    assert limiter.admit(tokens, now=0.0) is None
    limiter.record_tokens(tokens, 60, now=1.0)
    assert limiter.admit(tokens, now=2.0) is None
    limiter.record_tokens(tokens, 50, now=3.0)
    wait = limiter.admit(tokens, now=4.0)
    assert wait == pytest.approx(57.0)  # until the 60 tokens of second 1 leave the window
    assert limiter.admit(tokens, now=61.0) is None

    free = Key("f", "3" * 8, frozenset({"chat"}), None, None, None, None, datetime.now(UTC))
    assert all(limiter.admit(free, now=0.0) is None for _ in range(1000))


def test_the_cli_creates_lists_and_revokes(tmp_path, capsys):
    path = tmp_path / "sub" / "keys.json"
    code, out, err = run(capsys, "keys", "create", "--keys", str(path), "--name", "alice", "--scopes",
                         "chat,completions", "--models", "m1,m2", "--rpm", "60", "--tpm", "5000",
                         "--expires", "2999-01-31")
    assert code == 0 and out.startswith("lmf-") and len(out.strip().splitlines()) == 1
    assert "only" in err and str(path) in err
    token = out.strip()
    key = KeyStore(path).authenticate(token)
    assert key.models == ("m1", "m2") and key.scopes == {"chat", "completions"} and key.rpm == 60
    assert run(capsys, "keys", "create", "--keys", str(path), "--name", "bob", "--scopes", "admin")[0] == 0

    code, out, _ = run(capsys, "keys", "list", "--keys", str(path))
    assert code == 0 and "alice" in out and "bob" in out and key.key_id in out and "m1,m2" in out
    assert "2999-02-01" in out and "5000" in out
    for record in json.loads(path.read_text())["keys"]:
        assert record["hash"] not in out and record["salt"] not in out
    assert token.split("-", 2)[2] not in out

    code, out, _ = run(capsys, "keys", "revoke", "--keys", str(path), "alice")
    assert code == 0 and "alice" in out
    assert [k.name for k in list_keys(path)] == ["bob"]


@pytest.mark.parametrize("args, fragment", [
    (["--name", "alice", "--scopes", "chat"], "already has a key named 'alice'"),
    (["--name", "x", "--scopes", "chat,root"], "unknown scope 'root'; choose from chat, completions"),
    (["--name", "x", "--scopes", ","], "no scopes"),
    (["--name", "x", "--scopes", "chat", "--expires", "2001-01-01"], "in the past"),
    (["--name", "x", "--scopes", "chat", "--expires", "next week"], "not an ISO date"),
    (["--name", "x", "--scopes", "chat", "--rpm", "0"], "--rpm 0"),
    (["--name", "x y", "--scopes", "chat"], "key name"),
])
def test_cli_mistakes_in_create_are_one_line(args, fragment, tmp_path, capsys):
    path = tmp_path / "keys.json"
    create_key(path, "alice", ["chat"])
    before = path.read_bytes()
    err = user_error(capsys, "keys", "create", "--keys", str(path), *args)
    assert fragment in err
    assert path.read_bytes() == before


def test_cli_revoke_unknown_and_a_file_that_is_not_a_keys_file(tmp_path, capsys):
    path = tmp_path / "keys.json"
    create_key(path, "alice", ["chat"])
    create_key(path, "bob", ["chat"])
    err = user_error(capsys, "keys", "revoke", "--keys", str(path), "carol")
    assert "'carol'" in err and "alice, bob" in err
    err = user_error(capsys, "keys", "list", "--keys", str(tmp_path / "nope.json"))
    assert "no such keys file" in err


def test_a_damaged_file_through_the_real_command_line(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("{broken")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "lmforge", "keys", "list", "--keys", str(path)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and str(path) in r.stderr


def test_the_verbs_have_help_and_import_nothing_heavy(tmp_path, capsys):
    from lmforge.cli import VERBS
    from lmforge.cligen import verb_params

    for name in ("keys create", "keys list", "keys revoke"):
        code, out, _ = run(capsys, *name.split(), "--help")
        assert code == 0 and out.startswith(f"usage: lmforge {name} ")
        for p in verb_params(VERBS[name], VERBS[name].load()):  # every parameter documented under Args:
            assert (p.name.upper() if p.positional else p.flag) in out
    script = ("import sys\nimport lmforge.server.keys\n"  # the standard library and lmforge.errors only
              "ours = sorted(m for m in sys.modules if m.startswith('lmforge'))\n"
              "assert ours == ['lmforge', 'lmforge.errors', 'lmforge.server', 'lmforge.server.keys'], ours\n"
              "assert not {'torch', 'numpy', 'yaml'} & set(sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
