"""The ONNX export and the onnxruntime engine (`lmforge.infer.onnx`): logits and greedy generations
match lmforge's torch path on tiny GPT-2 style and Llama style (grouped-query) decoders, through the
Python API and the CLI; int8 stays close; bad input is a one-line error that writes nothing.

Each export traces the model with torch's dynamo exporter (several seconds), so the exports are made
once per module and shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.infer import left_pad
from lmforge.infer.generate import generate, generate_ids
from lmforge.models.decoder import Decoder
from lmforge.train.checkpoint import save_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lmforge.infer.onnx import export_onnx, load_onnx  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # left-padded to 5: pads of 0, 3 and 2


@pytest.fixture(scope="module")
def models(tokenizer, make_config) -> dict[str, Decoder]:
    out = {}
    for seed, style in enumerate(("gpt2", "llama")):
        torch.manual_seed(seed)
        model = Decoder(make_config(style)).eval()
        model.tokenizer = tokenizer
        out[style] = model
    return out


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory) -> dict[str, Path]:
    """The GPT-2 style model as a checkpoint exported by the CLI; the Llama style one by `export_onnx`,
    in fp32 and int8."""
    root = tmp_path_factory.mktemp("onnx")
    save_checkpoint(root / "gpt2-ckpt", models["gpt2"])
    assert main(["export", str(root / "gpt2-ckpt"), "--format", "onnx", "--out", str(root / "gpt2-onnx")]) == 0
    return {"gpt2-ckpt": root / "gpt2-ckpt", "gpt2": root / "gpt2-onnx",
            "llama": export_onnx(models["llama"], root / "llama-onnx"),
            "llama-int8": export_onnx(models["llama"], root / "llama-int8", dtype="int8")}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_prefill_and_decode_logits_match_torch(models, exports, style) -> None:
    """A left-padded batch of prompts of different lengths, then three decode steps: within 1e-4 (fp32)."""
    model, engine = models[style], load_onnx(exports[style])
    tokens, pad = left_pad(PROMPTS, "cpu")
    ours, theirs = model.new_cache(3, 16, pad), engine.new_cache(3, 16, pad)
    with torch.no_grad():
        expected, got = model(tokens, cache=ours), engine(tokens, cache=theirs)
        real = torch.arange(tokens.shape[1])[None] >= pad[:, None]
        assert torch.isfinite(got).all()
        assert (expected - got).abs()[real].max() < 1e-4
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            step = torch.randint(0, model.config.vocab_size, (3, 1), generator=generator)
            expected, got = model(step, cache=ours, last_only=True), engine(step, cache=theirs, last_only=True)
            assert got.shape == (3, 1, model.config.vocab_size)
            assert (expected - got).abs().max() < 1e-4
    assert theirs.length == ours.length == tokens.shape[1] + 3


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_greedy_generation_is_identical(models, exports, style) -> None:
    """Batched greedy generation, past the context (the loop's sliding window rebuilds the cache), and
    the text loop with a stop string and a stream: the same tokens and texts as torch."""
    model, engine = models[style], load_onnx(exports[style])
    assert generate_ids(engine, PROMPTS, max_new_tokens=40, temperature=0) == \
        generate_ids(model, PROMPTS, max_new_tokens=40, temperature=0)
    pieces: list[str] = []
    expected = generate(model, "Shall I", max_new_tokens=12, temperature=0, stop=["summer"])
    assert generate(engine, "Shall I", max_new_tokens=12, temperature=0, stop=["summer"],
                    stream=pieces.append) == expected
    assert "".join(pieces) == expected[0]
    sampled = dict(max_new_tokens=8, temperature=0.9, top_k=20, num_samples=2, seed=3)
    assert engine.generate("Thou art", **sampled) == model.generate("Thou art", **sampled)


def test_cli_generate_runs_the_export(exports, capsys) -> None:
    """`lmforge generate DIR` on an export, and `--engine onnxruntime` on the checkpoint: torch's greedy text."""
    args = ["--prompt", "Shall I compare", "--temperature", "0", "--max-new-tokens", "15"]
    assert main(["generate", str(exports["gpt2-ckpt"]), *args, "--engine", "torch"]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", str(exports["gpt2"]), *args]) == 0
    assert capsys.readouterr().out == expected
    assert main(["generate", str(exports["gpt2-ckpt"]), *args, "--engine", "onnxruntime"]) == 0
    assert capsys.readouterr().out == expected
    assert expected.startswith("Shall I compare") and len(expected) > len("Shall I compare\n")


def test_int8_export_stays_close(models, exports) -> None:
    """Dynamic int8 weights: the same top token at most positions, and it generates."""
    model, engine = models["llama"], load_onnx(exports["llama-int8"])
    assert engine.info["dtype"] == "int8"
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
        got = engine(ids, cache=engine.new_cache(2))
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9
    assert (expected - got).abs().max() < 0.1
    assert len(generate_ids(engine, PROMPTS, max_new_tokens=10, temperature=0)[0]) == 10
    fp32_size = (exports["llama"] / "model.onnx").stat().st_size
    assert (exports["llama-int8"] / "model.onnx").stat().st_size < fp32_size


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_bad_input_is_a_one_line_error(exports, tmp_path, capsys, monkeypatch) -> None:
    """An export without config.json, an --out that exists, torch on an export, onnxruntime missing:
    exit 2, one line, nothing written."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes((exports["gpt2"] / "model.onnx").read_bytes())
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me\n")
    before = _listing(tmp_path)
    cases = [
        (["generate", str(broken), "--prompt", "x"], ("broken/config.json is missing",)),
        (["export", str(exports["gpt2-ckpt"]), "--format", "onnx", "--out", str(full)],
         ("full already exists and is not empty", "nothing was written")),
        (["generate", str(exports["gpt2"]), "--prompt", "x", "--engine", "torch"],
         ("is an ONNX export", "--engine onnxruntime")),
        (["export", str(exports["gpt2-ckpt"]), "--format", "hf", "--onnx-dtype", "int8", "--out", str(tmp_path / "o")],
         ("--onnx-dtype int8 applies to --format onnx only",)),
    ]
    for args, fragments in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(f in err[0] for f in fragments), (args, err)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert main(["generate", str(exports["gpt2"]), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'lmforge[onnx]'" in err[0], err
    assert _listing(tmp_path) == before
    assert (full / "notes.txt").read_text() == "keep me\n"
