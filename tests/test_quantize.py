"""Weight-only quantization: the storage, every low-bit kernel against the weights it stands for, GPTQ
against round-to-nearest, the `lmforge quantize` verb end to end, and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import corpus_documents
from safetensors import safe_open

import lmforge
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer.quantize import gptq, quantize
from lmforge.kernels import quantized as Q
from lmforge.train.checkpoint import save_checkpoint


def weight_and_inputs(d_out: int = 48, d_in: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs whose features are correlated (as a real layer's are), so that GPTQ has
    something to make up for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g) * 0.3
    return torch.randn(d_out, d_in, generator=g), x


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_round_to_nearest_codes_stand_for_the_weight_within_half_a_step(bits, group):
    w, _ = weight_and_inputs()
    layer = Q.QuantizedLinear.from_weight(w, None, bits, group)
    step = layer.scales if bits == 8 else layer.scales.repeat_interleave(group, 1)
    error = (layer.dequantize() - w).abs()
    assert (error <= (step[:, None] if bits == 8 else step) * 0.5 + 1e-6).all()
    assert layer.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert layer.qweight.numel() == w.numel() // (1 if bits == 8 else 2)  # int4: two codes a byte
    codes = Q.unpack_nibbles(layer.qweight) if bits == 4 else layer.qweight
    assert torch.equal(Q.pack_nibbles(codes), layer.qweight) if bits == 4 else codes.abs().max() <= 127


@pytest.mark.parametrize("bits", [4, 8])
def test_every_kernel_multiplies_by_the_weight_the_codes_stand_for(bits):
    w, x = weight_and_inputs(d_out=96, d_in=128)
    bias = torch.randn(96)
    layer = Q.QuantizedLinear.from_weight(w, bias, bits, 32)
    rows = x[:5]
    expected = rows @ layer.dequantize().T + bias
    for kernel in Q.runnable(bits):
        got = Q.KERNEL_CALLS[kernel](layer, rows) + bias
        # fp32 activations: the same sums in another order; bf16 activations: bf16's 8 bits of mantissa
        tolerance = 1e-4 if not kernel.endswith("bf16") else 2e-2
        scale = expected.abs().max()
        assert (got.float() - expected).abs().max() <= tolerance * scale, kernel


def test_the_layer_uses_the_race_winner_and_keeps_shapes_and_dtypes():
    w, x = weight_and_inputs(d_out=64, d_in=96)
    layer = Q.QuantizedLinear.from_weight(w, torch.zeros(64), 4, 32)
    for rows in (1, 8, 100):
        v = Q.verdict(4, 32, rows, tiny=True)
        assert v["kernel"] == min(v["ms"], key=v["ms"].get)  # the fastest of those that ran
        assert set(v["ms"]) <= set(Q.KERNELS[4])
    y = layer(x[:6].reshape(2, 3, 96))
    assert y.shape == (2, 3, 64) and y.dtype == torch.float32
    assert layer(x[:2].bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_gptq_changes_a_layers_outputs_less_than_rounding_to_nearest(bits, group):
    w, x = weight_and_inputs(seed=1)
    hessian = 2 * x.T @ x / len(x)
    rtn = Q.QuantizedLinear.from_weight(w, None, bits, group)
    calibrated = Q.QuantizedLinear(w.shape[1], w.shape[0], bits, group, bias=False)
    calibrated.set_codes(*gptq(w, hessian, bits, group or w.shape[1]))

    def output_error(layer):
        return (x @ (w - layer.dequantize()).T).pow(2).mean()

    assert output_error(calibrated) < 0.75 * output_error(rtn)  # measured: about half


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory, tokenizer, make_model) -> Path:
    out = tmp_path_factory.mktemp("quantize") / "float"
    model = make_model("llama", d_model=64, n_head=4, n_kv_head=2)
    model.tokenizer = tokenizer
    save_checkpoint(out, model)
    return out


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("".join(d.text for d in corpus_documents()))
    return path


def mean_loss(model, ids):
    with torch.no_grad():
        return model(ids[:, :-1], ids[:, 1:]).item()


@pytest.mark.parametrize("args", [["--bits", "8"], ["--bits", "4", "--group-size", "32"],
                                  ["--bits", "4", "--group-size", "16", "--method", "gptq", "--head-bits", "0"]])
def test_cli_quantizes_and_every_loader_reads_it(float_checkpoint, calibration_text, tokenizer, tmp_path, args, capsys):
    out = tmp_path / "q"
    extra = ["--calib", str(calibration_text), "--calib-tokens", "32", "--calib-samples", "8"] if "gptq" in args else []
    assert main(["quantize", str(float_checkpoint), "--out", str(out), *args, *extra]) == 0
    assert "checkpoint to" in capsys.readouterr().out
    bits = int(args[1])
    config = json.loads((out / "config.json").read_text())
    spec = config["quantization"]
    assert spec["bits"] == bits and spec["layers"]["blocks.0.attn.qkv"] == bits
    assert spec["layers"].get("head") == (None if "--head-bits" in args else 8)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("blocks.0.mlp.up.qweight").dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert (out / "model.safetensors").stat().st_size < 0.6 * (float_checkpoint / "model.safetensors").stat().st_size

    original, quantized = lmforge.load(float_checkpoint), lmforge.load(out)
    assert isinstance(quantized.blocks[1].mlp.down, Q.QuantizedLinear)
    ids = torch.tensor([tokenizer.encode(corpus_documents()[2].text)[:32]])
    with torch.no_grad():
        logits, reference = quantized(ids), original(ids)
    relative = (logits - reference).norm() / reference.norm()
    assert relative < (0.02 if bits == 8 else 0.15)
    assert abs(mean_loss(quantized, ids) - mean_loss(original, ids)) < (0.01 if bits == 8 else 0.1)
    text = quantized.generate("Shall I", max_new_tokens=6, temperature=0)[0]
    assert isinstance(text, str) and text
    bf16 = lmforge.load(out, dtype=torch.bfloat16)  # generate --dtype bf16
    assert bf16.generate("Shall I", max_new_tokens=4, temperature=0)[0]


def test_kernels_off_gives_the_same_model(float_checkpoint, tmp_path, tokenizer, monkeypatch):
    out = quantize(float_checkpoint, tmp_path / "q4", bits=4, group_size=32)
    model = lmforge.load(out)
    ids = torch.tensor([tokenizer.encode("Shall I compare thee")])
    with torch.no_grad():
        fast = model(ids)
        monkeypatch.setenv("LMFORGE_KERNELS", "off")
        assert Q.kernel_for(4, 32, 1, torch.device("cpu")) == "dequantize"
        plain = model(ids)
    assert (fast - plain).abs().max() < 0.05 * plain.abs().max()  # a bf16-input kernel may have won the race


def test_a_quantized_classifier_still_classifies(tmp_path, tokenizer, make_model):
    from lmforge.recipes.classify import Classifier
    from lmforge.tasks.classify import predict

    backbone = make_model("gpt2", d_model=64)
    backbone.tokenizer = tokenizer
    classifier = Classifier(backbone, ["fresh", "rotten"])
    save_checkpoint(tmp_path / "clf", classifier)
    quantize(tmp_path / "clf", tmp_path / "clf-int8", bits=8)
    texts = ["Shall I compare thee", "Rough winds do shake"]
    before, after = predict(tmp_path / "clf", texts, device="cpu"), predict(tmp_path / "clf-int8", texts, device="cpu")
    for a, b in zip(before, after):
        assert abs(a["probabilities"]["fresh"] - b["probabilities"]["fresh"]) < 0.02


def test_bad_input_is_one_line_exit_2_and_writes_nothing(float_checkpoint, tmp_path, capsys):
    q8 = quantize(float_checkpoint, tmp_path / "q8", bits=8)
    cases = [
        ([str(q8), "--out", str(tmp_path / "a")], "quantized already"),
        ([str(float_checkpoint), "--out", str(tmp_path / "b"), "--group-size", "48"], "does not divide"),
        ([str(float_checkpoint), "--out", str(tmp_path / "c"), "--method", "gptq"], "needs calibration text"),
        ([str(float_checkpoint), "--out", str(tmp_path / "d"), "--method", "awq"], "expected one of rtn, gptq"),
        ([str(float_checkpoint), "--out", str(q8)], "exists"),
    ]
    for args, message in cases:
        assert main(["quantize", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]

    config = json.loads((q8 / "config.json").read_text())
    config["quantization"]["layers"]["blocks.0.attn.qkv"] = 3  # an altered record
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in q8.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="damaged checkpoint"):
        lmforge.load(broken)


# ----------------------------------------------------------------------------------------------
# GGUF files: their 4-bit blocks imported as they are


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_blocks_decode_as_llama_cpp_reads_them(qtype):
    """Random raw blocks (any bytes are a valid block once the fp16 scales are finite) decoded by lmforge
    and by the gguf package's reference dequantizer give the same weights."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from lmforge.interop import gguf_4bit_blocks

    kind = gguf.GGMLQuantizationType[qtype]
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(6, 2 * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(6, 2, block_bytes)
    for start in (0, 2) if qtype != "Q4_0" else (0,):  # fp16 scales (and mins) of a sane size
        blocks[..., start:start + 2] = np.frombuffer(rng.uniform(0.01, 0.1, (6, 2)).astype(np.float16).tobytes(),
                                                     np.uint8).reshape(6, 2, 2)
    codes, scales, offsets = gguf_4bit_blocks(qtype, raw)
    ours = codes.float() * scales.repeat_interleave(32, 1) + offsets.repeat_interleave(32, 1)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    assert ours.shape == reference.shape == (6, 2 * block_weights)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_import_keeps_the_4bit_layers_and_matches_transformers(qtype, tmp_path):
    pytest.importorskip("gguf")
    import transformers
    from test_convert import LLAMA_SHAPE, chat_tokenizer, randomize, write_tiny_gguf

    tokenizer = chat_tokenizer.__wrapped__()
    config = transformers.LlamaConfig(**LLAMA_SHAPE, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    write_tiny_gguf(tmp_path / "tiny.gguf", randomize(transformers.LlamaForCausalLM(config), seed=3), tokenizer, qtype)
    assert main(["import", str(tmp_path / "tiny.gguf"), str(tmp_path / "kept")]) == 0
    assert main(["import", str(tmp_path / "tiny.gguf"), str(tmp_path / "float"), "--dequantize"]) == 0
    spec = json.loads((tmp_path / "kept" / "config.json").read_text())["quantization"]
    assert spec["method"] == f"gguf {qtype}" and spec["layers"]["blocks.1.mlp.up"] == 4 and spec["layers"]["head"] == 8
    assert "quantization" not in json.loads((tmp_path / "float" / "config.json").read_text())
    kept, dense = lmforge.load(tmp_path / "kept"), lmforge.load(tmp_path / "float")
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.up", "blocks.1.mlp.down"):  # the file's very codes
        assert torch.allclose(kept.get_submodule(name).dequantize(), dense.get_submodule(name).weight, atol=1e-6)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    ids = torch.randint(0, LLAMA_SHAPE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = kept(ids), reference(ids).logits
    assert (ours - theirs).norm() / theirs.norm() < 0.02  # the head alone differs: Q4 blocks -> int8 rows
    # a quantized checkpoint is a base that trains in float, and exports to transformers in float
    assert main(["export", str(tmp_path / "kept"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    in_float = lmforge.load(tmp_path / "kept", dequantize=True)
    assert not any(isinstance(m, Q.QuantizedLinear) for m in in_float.modules())
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, in_float(ids), atol=1e-4)
