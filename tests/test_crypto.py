"""Encryption at rest (lmforge.crypto): round trips, encrypted runs and shards that load as their plain twins and
leave no plaintext on disk, and every kind of damage or wrong key refused with one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from server_util import running

import lmforge
from lmforge import crypto
from lmforge.cli import main
from lmforge.errors import UserError

WORDS = "king queen river garden night song bird forest".split()
CHUNK = 64  # small chunks, so a short file has several to swap
TRAIN = ["--preset", "tiny", "--model.block_size", "32", "--train.max_steps", "4", "--train.eval_interval", "4",
         "--train.eval_batches", "1", "--train.precision", "fp32", "--train.seed", "3"]


def cli(capsys, *args: str) -> tuple[int, str]:
    """`lmforge ARGS` through `main` in this process: exit code and stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def files_under(path: Path) -> list[Path]:
    return [p for p in sorted(path.rglob("*")) if p.is_file()]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Keys, a corpus, plain and encrypted token shards, and a plain and an encrypted tiny run of the same seed."""
    root = tmp_path_factory.mktemp("crypto")
    crypto.keygen(str(root / "data.key"))
    crypto.keygen(str(root / "other.key"))
    (root / "pass.txt").write_text("correct horse battery staple\n")
    (root / "a.txt").write_text(" ".join(f"the {a} and the {b}." for a in WORDS for b in WORDS) * 3)
    assert main(["prepare", "--data", str(root / "a.txt"), "--out", str(root / "data"), "--vocab-size", "300",
                 "--no-clean"]) == 0
    assert main(["prepare", "--data", str(root / "a.txt"), "--out", str(root / "data-enc"), "--vocab-size", "300",
                 "--no-clean", "--encrypt-key-file", str(root / "data.key")]) == 0
    assert main(["pretrain", "--data", str(root / "data"), "--out", str(root / "run"), *TRAIN]) == 0
    assert main(["pretrain", "--data", str(root / "data"), "--out", str(root / "run-enc"), *TRAIN,
                 "--encrypt-key-file", str(root / "data.key")]) == 0
    return root


# ----------------------------------------------------------------------------------------------
# the format and the keys


@pytest.mark.parametrize("passphrase", [False, True])
def test_bytes_round_trip_at_every_chunk_boundary(tmp_path, passphrase):
    key = crypto.Key(b"a passphrase" if passphrase else os.urandom(32), passphrase=passphrase)
    for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5):
        data = os.urandom(size)
        stored = crypto.encrypt_bytes(data, key, CHUNK)
        assert data[:16] not in stored or size < 16
        (tmp_path / "f").write_bytes(stored)
        assert bytes(crypto.read_bytes(tmp_path / "f", key)) == data
        assert crypto.plaintext_size(tmp_path / "f") == size
    first, second = crypto.encrypt_bytes(b"same", key), crypto.encrypt_bytes(b"same", key)
    assert first != second  # a random nonce per chunk


def test_files_and_directories_round_trip_through_the_verbs(tmp_path, capsys):
    crypto.keygen(str(tmp_path / "k"))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(os.urandom(5000))
    (tree / "sub" / "b.txt").write_text("secret text\n")
    (tree / "empty").write_bytes(b"")
    assert cli(capsys, "encrypt", tree, "--key-file", tmp_path / "k", "--out", tmp_path / "enc",
               "--chunk-kib", "1")[0] == 0
    assert all(crypto.is_encrypted(p) for p in files_under(tmp_path / "enc"))
    assert b"secret" not in b"".join(p.read_bytes() for p in files_under(tmp_path / "enc"))
    assert cli(capsys, "decrypt", tmp_path / "enc", "--key-file", tmp_path / "k", "--out", tmp_path / "dec")[0] == 0
    assert [p.relative_to(tmp_path / "dec") for p in files_under(tmp_path / "dec")] == \
           [p.relative_to(tree) for p in files_under(tree)]
    assert all((tmp_path / "dec" / p.relative_to(tree)).read_bytes() == p.read_bytes() for p in files_under(tree))
    # a single file too, with a passphrase
    (tmp_path / "pass").write_text("hunter2 but longer\n")
    assert cli(capsys, "encrypt", tree / "a.bin", "--key-file", tmp_path / "pass", "--out", tmp_path / "a.enc")[0] == 0
    assert cli(capsys, "decrypt", tmp_path / "a.enc", "--key-file", tmp_path / "pass", "--out", tmp_path / "a")[0] == 0
    assert (tmp_path / "a").read_bytes() == (tree / "a.bin").read_bytes()


def test_keygen_makes_a_private_data_key_and_never_overwrites(tmp_path, capsys):
    code, _ = cli(capsys, "keygen", "--out", tmp_path / "k")
    assert code == 0 and (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    text = (tmp_path / "k").read_text()
    assert text.startswith(crypto.DATA_KEY_PREFIX)
    key = crypto.load_key(tmp_path / "k")
    assert not key.passphrase and len(key.secret) == 32 and key.secret.hex() not in repr(key)
    assert crypto.key_id(key.secret) not in key.secret  # the id is a hash, not a piece of the key
    assert_one_line_error(*cli(capsys, "keygen", "--out", tmp_path / "k"), "already exists")
    assert (tmp_path / "k").read_text() == text
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        crypto.load_key(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# encrypted runs, shards and exports


def test_encrypted_run_gives_the_plain_twins_logits_and_leaves_no_plaintext(ws):
    plain = lmforge.load(ws / "run")
    encrypted = lmforge.load(ws / "run-enc", key=ws / "data.key")
    ids = torch.tensor([plain.tokenizer.encode("the king and the queen")])
    with torch.no_grad():
        torch.testing.assert_close(encrypted(ids)[0], plain(ids)[0], rtol=0, atol=0)
    checkpoint = ws / "run-enc" / "checkpoint"
    assert all(crypto.is_encrypted(p) for p in files_under(checkpoint))
    stored = b"".join(p.read_bytes() for p in files_under(ws / "run-enc"))
    for name, tensor in plain.state_dict().items():  # no weight's bytes anywhere in the run directory
        assert tensor.float().numpy().tobytes()[:32] not in stored, name
    assert plain.tokenizer.to_json().encode()[:40] not in stored
    assert not [p for p in (ws / "run-enc").rglob(".*")]  # no temporary file left anywhere
    with pytest.raises(UserError, match="is encrypted; pass --key-file"):
        lmforge.load(ws / "run-enc")
    with pytest.raises(UserError, match="not encrypted, but a key was given"):
        lmforge.load(ws / "run", key=ws / "data.key")
    with pytest.raises(UserError, match="another key"):
        lmforge.load(ws / "run-enc", key=ws / "other.key")


def test_encrypted_run_resumes(ws, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ws / "run-enc", run)
    args = ["pretrain", "--data", ws / "data", "--out", run, *TRAIN, "--train.max_steps", "6", "--resume"]
    assert_one_line_error(*cli(capsys, *args), "is encrypted")  # the key is needed to resume
    code, err = cli(capsys, *args, "--encrypt-key-file", ws / "data.key")
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 6
    assert crypto.is_encrypted(run / "checkpoint" / "model.safetensors")
    with crypto.reading_key(ws / "data.key"):
        assert lmforge.train.checkpoint.load_trainer_state(run / "checkpoint")["step"] == 6


def test_encrypted_shards_train_with_the_key_and_match_the_plain_ones(ws, tmp_path, capsys):
    from lmforge.data import TokenShards

    assert all(crypto.is_encrypted(p) for p in files_under(ws / "data-enc"))
    assert b"queen" not in b"".join(p.read_bytes() for p in files_under(ws / "data-enc"))
    with crypto.reading_key(ws / "data.key"):
        encrypted = TokenShards(ws / "data-enc")
        assert (encrypted.split("train") == TokenShards(ws / "data").split("train")).all()
        assert not encrypted.split("train").flags.writeable
    out = tmp_path / "run"
    assert_one_line_error(*cli(capsys, "pretrain", "--data", ws / "data-enc", "--out", out, *TRAIN),
                          "meta.json is encrypted; pass --key-file")
    code, err = cli(capsys, "pretrain", "--data", ws / "data-enc", "--out", out, *TRAIN, "--key-file", ws / "data.key")
    assert code == 0, err
    assert not crypto.is_encrypted(out / "checkpoint" / "model.safetensors")  # written plain: no --encrypt-key-file


def test_quantize_and_hf_export_write_encrypted(ws, tmp_path, capsys):
    key = ws / "data.key"
    code, err = cli(capsys, "quantize", ws / "run-enc", "--bits", "8", "--method", "rtn", "--out", tmp_path / "q",
                    "--key-file", key, "--encrypt-key-file", key)
    assert code == 0, err
    assert all(crypto.is_encrypted(p) for p in files_under(tmp_path / "q"))
    assert lmforge.load(tmp_path / "q", key=key).quantization["bits"] == 8
    code, err = cli(capsys, "export", ws / "run-enc", "--out", tmp_path / "hf", "--key-file", key,
                    "--encrypt-key-file", key)
    assert code == 0, err
    assert cli(capsys, "export", ws / "run", "--out", tmp_path / "hf-plain")[0] == 0
    assert cli(capsys, "decrypt", tmp_path / "hf", "--key-file", key, "--out", tmp_path / "hf-dec")[0] == 0
    for plain in files_under(tmp_path / "hf-plain"):
        assert (tmp_path / "hf-dec" / plain.name).read_bytes() == plain.read_bytes(), plain.name
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the encrypted Hugging Face directory loads too, in memory
        torch.testing.assert_close(lmforge.load(tmp_path / "hf", key=key)(ids), lmforge.load(ws / "run")(ids))
    assert_one_line_error(*cli(capsys, "generate", ws / "run", "--encrypt-key-file", key), "writes no checkpoint")


def test_lora_finetune_writes_encrypted_adapters_that_load_with_the_key(ws, tmp_path, capsys):
    (tmp_path / "chat.txt").write_text("the king and the queen sing by the river at night.\n" * 40)
    out, key = tmp_path / "lora", ws / "data.key"
    code, err = cli(capsys, "finetune", ws / "run-enc", tmp_path / "chat.txt", "--out", out, "--method", "lora",
                    "--train.max_steps", "2", "--train.eval_interval", "2", "--train.precision", "fp32",
                    "--key-file", key, "--encrypt-key-file", key)
    assert code == 0, err
    best = out / "best"
    assert (best / "adapter_model.safetensors").is_file()
    assert all(crypto.is_encrypted(p) for p in files_under(best))
    model = lmforge.load(out, key=key)  # the base (itself encrypted) with the adapters folded in, in memory
    assert model(torch.tensor([[1, 2, 3]])).shape[-1] == model.config.vocab_size


def test_checkpoints_encrypted_afterwards_load_and_sealed_files_cannot_be_swapped(ws, tmp_path, capsys):
    key = ws / "data.key"
    assert cli(capsys, "encrypt", ws / "run", "--key-file", key, "--out", tmp_path / "enc")[0] == 0
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():  # lmforge.json records the contents: still valid once encrypted (checked by hashing)
        torch.testing.assert_close(lmforge.load(tmp_path / "enc", key=key)(ids), lmforge.load(ws / "run")(ids))
    assert cli(capsys, "decrypt", tmp_path / "enc", "--key-file", key, "--out", tmp_path / "dec")[0] == 0
    assert all((tmp_path / "dec" / p.relative_to(ws / "run")).read_bytes() == p.read_bytes()
               for p in files_under(ws / "run"))
    # a file from another checkpoint under the same key authenticates, but is not the one recorded
    swapped = tmp_path / "swapped"
    shutil.copytree(ws / "run-enc", swapped)
    with crypto.writing_key(key):
        crypto.write_bytes(swapped / "checkpoint" / "tokenizer.json", lmforge.load(ws / "run").tokenizer.to_json())
    with pytest.raises(UserError, match="not the encrypted file lmforge.json records"):
        lmforge.load(swapped, key=key)


def test_onnx_export_writes_an_encrypted_graph_that_runs_from_memory(ws, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    key = ws / "data.key"
    code, err = cli(capsys, "export", ws / "run-enc", "--format", "onnx", "--out", tmp_path / "onnx",
                    "--key-file", key, "--encrypt-key-file", key)
    assert code == 0, err
    assert all(crypto.is_encrypted(p) for p in files_under(tmp_path / "onnx"))
    greedy = ["--prompt", "the king", "--max-new-tokens", "6", "--temperature", "0"]
    capsys.readouterr()
    assert main(["generate", str(ws / "run"), *greedy]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "onnx"), *greedy, "--key-file", str(key)]) == 0
    assert capsys.readouterr().out == expected  # the same greedy text as the plain checkpoint
    assert_one_line_error(*cli(capsys, "export", ws / "run", "--format", "onnx", "--onnx-dtype", "int8", "--out",
                               tmp_path / "int8", "--encrypt-key-file", key), "fp32")


def test_server_serves_an_encrypted_checkpoint_with_the_environment_key(ws, monkeypatch):
    from lmforge.server.app import create_app, load_served

    monkeypatch.setenv(crypto.ENV_KEY_FILE, str(ws / "data.key"))
    app = create_app(load_served([f"tiny={ws / 'run-enc'}"], device="cpu"))
    with running(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "the king", "max_tokens": 4},
                       timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


# ----------------------------------------------------------------------------------------------
# damage and wrong keys: one line, exit 2, nothing written


def encrypted_file(tmp_path: Path, key_file: Path) -> tuple[Path, bytes]:
    data = os.urandom(5 * CHUNK + 7)
    (tmp_path / "f.enc").write_bytes(crypto.encrypt_bytes(data, crypto.load_key(key_file), CHUNK))
    return tmp_path / "f.enc", data


def swap_chunks(stored: bytes) -> bytes:
    start, size = 22, CHUNK + crypto.NONCE + crypto.TAG
    first, second = stored[start:start + size], stored[start + size:start + 2 * size]
    return stored[:start] + second + first + stored[start + 2 * size:]


DAMAGE = {
    "header byte (chunk size)": (lambda b: b[:13] + bytes([b[13] ^ 1]) + b[14:], "truncated"),
    "header byte (key id)": (lambda b: b[:16] + bytes([b[16] ^ 1]) + b[17:], "another key"),
    "header byte (version)": (lambda b: b[:8] + b"\x07" + b[9:], "format version 7"),
    "chunk byte": (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "fails authentication at chunk 0"),
    "dropped last chunk": (lambda b: b[:22 + 5 * (CHUNK + 28)], "fails authentication at chunk 4"),
    "truncated mid-chunk": (lambda b: b[:-3], "fails authentication"),
    "swapped chunks": (swap_chunks, "fails authentication at chunk 0"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_file_is_refused(ws, tmp_path, capsys, damage):
    path, _ = encrypted_file(tmp_path, ws / "data.key")
    change, message = DAMAGE[damage]
    path.write_bytes(change(path.read_bytes()))
    assert_one_line_error(*cli(capsys, "decrypt", path, "--key-file", ws / "data.key", "--out", tmp_path / "out"),
                          str(path), message)
    assert not (tmp_path / "out").exists()


def test_wrong_keys_and_the_wrong_kind_of_file_are_refused(ws, tmp_path, capsys):
    path, data = encrypted_file(tmp_path, ws / "data.key")
    out = tmp_path / "out"
    assert_one_line_error(*cli(capsys, "decrypt", path, "--key-file", ws / "other.key", "--out", out), "another key")
    assert_one_line_error(*cli(capsys, "decrypt", path, "--key-file", ws / "pass.txt", "--out", out),
                          "another key")
    assert_one_line_error(*cli(capsys, "decrypt", path, "--key-file", tmp_path / "nope", "--out", out),
                          "no such key file")
    (tmp_path / "p.enc").write_bytes(crypto.encrypt_bytes(data, crypto.load_key(ws / "pass.txt"), CHUNK))
    (tmp_path / "wrong").write_text("correct horse battery stable\n")
    assert_one_line_error(*cli(capsys, "decrypt", tmp_path / "p.enc", "--key-file", tmp_path / "wrong", "--out", out),
                          "wrong passphrase")
    assert_one_line_error(*cli(capsys, "decrypt", ws / "a.txt", "--key-file", ws / "data.key", "--out", out),
                          "a.txt is not encrypted")
    assert_one_line_error(*cli(capsys, "encrypt", path, "--key-file", ws / "data.key", "--out", out),
                          "already encrypted")
    assert not out.exists()
    assert cli(capsys, "decrypt", tmp_path / "p.enc", "--key-file", ws / "pass.txt", "--out", out)[0] == 0
    assert out.read_bytes() == data


def test_a_verb_on_an_encrypted_checkpoint_without_or_with_a_wrong_key(ws, tmp_path, capsys):
    """As a user runs it (a subprocess): the key from LMFORGE_KEY_FILE, or none; then in this process a wrong key
    and a changed lmforge.json."""
    run = tmp_path / "run"
    shutil.copytree(ws / "run-enc", run)
    generate = ["generate", str(run), "--prompt", "the", "--max-new-tokens", "3"]

    def in_subprocess(key: Path | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != crypto.ENV_KEY_FILE}
        env.update({"OMP_NUM_THREADS": "1", **({crypto.ENV_KEY_FILE: str(key)} if key else {})})
        return subprocess.run([sys.executable, "-m", "lmforge", *generate], env=env, capture_output=True, text=True,
                              timeout=120)

    assert in_subprocess(ws / "data.key").returncode == 0
    result = in_subprocess(None)
    assert_one_line_error(result.returncode, result.stderr, "is encrypted; pass --key-file")
    assert_one_line_error(*cli(capsys, *generate, "--key-file", ws / "other.key"), "another key")
    info = run / "checkpoint" / "lmforge.json"
    stored = info.read_bytes()
    info.write_bytes(stored[:60] + bytes([stored[60] ^ 1]) + stored[61:])
    assert_one_line_error(*cli(capsys, *generate, "--key-file", ws / "data.key"), "lmforge.json fails authentication")
