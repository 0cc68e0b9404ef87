"""Pruning: masks hit the requested sparsity and pattern with the scores the methods define, structured
pruning of parts that contribute nothing leaves the outputs unchanged, recovery keeps the zeros, every
loader reads the result (and transformers reads its export), and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import corpus_documents

import lmforge
from lmforge.cli import main
from lmforge.data.sources import calibration_sequences
from lmforge.infer.prune import plan_width, prune, prune_masks, prune_structured
from lmforge.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("".join(d.text for d in corpus_documents()))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer, make_model) -> Path:
    out = tmp_path_factory.mktemp("prune") / "llama"
    model = make_model("llama", d_model=64, n_head=4, n_kv_head=2, n_layer=3, block_size=64)
    model.tokenizer = tokenizer
    save_checkpoint(out, model)
    return out


def zero_share(weight: torch.Tensor) -> float:
    return (weight == 0).float().mean().item()


def test_magnitude_masks_hit_the_sparsity_in_each_part_and_drop_the_smallest(llama):
    model = lmforge.load(llama)
    masks = prune_masks(model, 0.5, "magnitude", None, None)
    assert set(masks) == {f"blocks.{i}.{p}" for i in range(3) for p in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    qkv = model.blocks[0].attn.qkv.weight
    for part, mask in zip(qkv.split([64, 32, 32]), masks["blocks.0.attn.qkv"].split([64, 32, 32])):
        assert mask.float().mean().item() == 0.5  # each of q, k, v on its own
        assert part[~mask].abs().max() <= part[mask].abs().min()
    down, mask = model.blocks[2].mlp.down.weight, masks["blocks.2.mlp.down"]
    assert mask.float().mean().item() == 0.5 and down[~mask].abs().max() <= down[mask].abs().min()


def test_wanda_scores_weights_by_their_inputs_norm_within_each_row(llama, calibration_text):
    model = lmforge.load(llama)
    sequences = calibration_sequences(str(calibration_text), model.tokenizer, 4, 32)
    masks = prune_masks(model, 0.25, "wanda", None, sequences)
    with torch.no_grad():  # the first layer's input, computed directly: the norm of the embedded tokens
        x = model.blocks[0].norm1(model.tok_emb(sequences)).reshape(-1, 64)
    score = model.blocks[0].attn.qkv.weight.abs() * x.pow(2).sum(0).sqrt()
    mask = masks["blocks.0.attn.qkv"]
    assert (mask.sum(1) == 48).all()  # a quarter of each row's 64 inputs
    dropped = torch.where(mask, torch.inf, score).min(1).values
    kept_lowest, dropped_highest = torch.where(mask, score, torch.inf).min(1).values, \
        torch.where(mask, -torch.inf, score).max(1).values
    assert (dropped_highest <= kept_lowest).all() and torch.isfinite(dropped).all()
    magnitude = prune_masks(model, 0.25, "magnitude", None, None)["blocks.0.attn.qkv"]
    assert not torch.equal(mask, magnitude)  # the inputs changed the choice


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_of_four_zeroes_two_in_every_four_consecutive_inputs(llama, calibration_text, tmp_path, method):
    calib = {"calib": str(calibration_text), "calib_tokens": 32, "calib_samples": 4} if method == "wanda" else {}
    out = prune(llama, tmp_path / "p", method=method, pattern="2:4", **calib)
    model = lmforge.load(out)
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.down", "blocks.2.mlp.up"):
        weight = model.get_submodule(name).weight
        assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name
    assert zero_share(model.head.weight) == 0 and zero_share(model.tok_emb.weight) == 0  # not pruned
    record = json.loads((out / "config.json").read_text())["pruning"]
    assert record["pattern"] == "2:4" and record["sparsity"] == 0.5 and record["layers"]["blocks.0.mlp.down"] == 0.5
    assert model.pruning == record


def zero_parts(model, heads: list[int], neurons: int, identity_block: int | None) -> None:
    """Make some parts contribute nothing: the output columns of `heads` in every block, the last `neurons`
    MLP neurons' output columns, and every output of `identity_block`."""
    hd = model.config.head_dim
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for h in heads:
                block.attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
            block.mlp.down.weight[:, model.config.d_ff - neurons:] = 0
            if i == identity_block:
                block.attn.proj.weight.zero_()
                block.mlp.down.weight.zero_()
                for bias in (block.attn.proj.bias, block.mlp.down.bias):
                    if bias is not None:
                        bias.zero_()


@pytest.mark.parametrize("style,heads", [("llama", [1, 2]), ("gpt2", [0, 3])])
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_structured_pruning_of_parts_that_contribute_nothing_leaves_the_outputs_unchanged(
        make_model, tokenizer, calibration_text, style, heads, method):
    model = make_model(style, d_model=64, n_head=4, n_layer=3, block_size=64, **({"n_kv_head": 2} if style == "llama"
                                                                                 else {}))
    model.tokenizer = tokenizer
    n_head, d_ff = plan_width(model.config, 0.5)  # what half of a block keeps
    assert n_head == 2 and d_ff < model.config.d_ff
    drop = 1 if method == "wanda" else 0  # ranking blocks takes calibration text
    zero_parts(model, heads, model.config.d_ff - d_ff, identity_block=1 if drop else None)
    ids = torch.tensor([tokenizer.encode(corpus_documents()[3].text)[:48]])
    sequences = calibration_sequences(str(calibration_text), tokenizer, 4, 32)
    sparsity = 1 - 0.5 * (3 - drop) / 3  # each remaining block keeps half
    smaller, cut = prune_structured(model, sparsity, method, sequences, drop)
    assert (smaller.config.n_layer, smaller.config.n_head, smaller.config.d_ff) == (3 - drop, 2, d_ff)
    assert smaller.config.head_dim == 16 and cut["blocks_removed"] == ([1] if drop else [])
    assert smaller.num_parameters() < model.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(smaller(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_structured_sparsity_is_the_share_of_the_blocks_parameters(llama, calibration_text, tmp_path):
    model = lmforge.load(llama)
    blocks = model.num_parameters() - model.tok_emb.weight.numel()  # the head is tied
    out = prune(llama, tmp_path / "s", pattern="structured", sparsity=0.5, calib=str(calibration_text),
                calib_tokens=32, calib_samples=4)
    small = lmforge.load(out)
    small_blocks = small.num_parameters() - small.tok_emb.weight.numel()
    assert abs(small_blocks / blocks - 0.5) < 0.06  # the MLP width moves in steps of 32 neurons
    assert small.pruning["from"] == {"n_layer": 3, "n_head": 4, "n_kv_head": 2, "d_ff": model.config.d_ff}


def test_structured_cli_recovers_and_every_verb_reads_the_smaller_model(llama, calibration_text, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "small"
    assert main(["prune", str(llama), "--pattern", "structured", "--sparsity", "0.67", "--drop-blocks", "1",
                 "--calib", str(calibration_text), "--calib-tokens", "32", "--calib-samples", "4",
                 "--recover-steps", "4", "--train.batch_size", "4", "--out", str(out)]) == 0
    assert "pruned model (structured, wanda)" in capsys.readouterr().out
    assert {"run.yaml", "metrics.jsonl", "loss.png", "pruned", "best"} <= {p.name for p in out.iterdir()}
    before, after = lmforge.load(out / "pruned"), lmforge.load(out)
    assert after.config.n_layer == 2 and after.config.n_head == 2 and after.pruning == before.pruning
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert main(["generate", str(out), "--prompt", "Shall I", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", str(out), "--task", "lm", "--data", str(calibration_text), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "lm.json").read_text())["scores"]["perplexity"] > 1
    quantized = lmforge.quantize(out, tmp_path / "q8", bits=8)
    assert lmforge.load(quantized).generate("Shall I", max_new_tokens=3)[0]
    # transformers reads the export: its heads are narrower than d_model / n_head, as config.json says
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([after.tokenizer.encode("Shall I compare thee")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, after(ids), rtol=1e-4, atol=1e-4)


def test_lora_recovery_loads_onto_the_pruned_base(llama, calibration_text, tmp_path):
    out = prune(llama, tmp_path / "lora", pattern="structured", sparsity=0.25, calib=str(calibration_text),
                calib_tokens=32, calib_samples=4, recover_steps=2, recover_method="lora",
                overrides={"train.batch_size": 4, "train.lr": 1e-2})
    assert (out / "best" / "adapter_config.json").is_file() and (out / "pruned" / "config.json").is_file()
    base, recovered = lmforge.load(out / "pruned"), lmforge.load(out)
    assert recovered.config == base.config
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), recovered.state_dict().values()))


def test_full_recovery_keeps_the_masks_zeros(llama, calibration_text, tmp_path):
    out = prune(llama, tmp_path / "r", method="magnitude", sparsity=0.5, recover_steps=3,
                recover_data=str(calibration_text), calib_tokens=32,
                overrides={"train.batch_size": 4, "train.lr": 1e-2})
    before, after = lmforge.load(out / "pruned"), lmforge.load(out)
    for name in ("blocks.0.attn.qkv", "blocks.2.mlp.down"):
        w0, w1 = before.get_submodule(name).weight, after.get_submodule(name).weight
        assert torch.equal(w0 == 0, w1 == 0) and zero_share(w1) == 0.5  # the same zeros, still half
        assert not torch.equal(w0, w1)  # and the rest trained


def test_bad_input_is_one_line_exit_2_and_writes_nothing(llama, calibration_text, tmp_path, capsys, make_model,
                                                        tokenizer):
    narrow = make_model("gpt2", d_model=30, n_head=2)  # 30 inputs: not groups of 4
    narrow.tokenizer = tokenizer
    save_checkpoint(tmp_path / "narrow", narrow)
    (tmp_path / "empty.txt").write_text("")
    from lmforge.recipes.classify import Classifier

    save_checkpoint(tmp_path / "classifier", Classifier(lmforge.load(llama), ["fresh", "rotten"]))
    calib = ["--calib", str(calibration_text)]
    cases = [
        ([str(llama), "--sparsity", "1.0", *calib], "expected a share in [0, 1)"),
        ([str(llama), "--sparsity", "-0.1", *calib], "expected a share in [0, 1)"),
        ([str(llama), *calib], "needs --sparsity"),
        ([str(llama), "--sparsity", "0.5"], "give --calib"),
        ([str(tmp_path / "narrow"), "--pattern", "2:4", "--method", "magnitude"], "groups of 4"),
        ([str(llama), "--pattern", "2:4", "--sparsity", "0.3", "--method", "magnitude"], "contradicts"),
        ([str(llama), "--pattern", "blocks", "--sparsity", "0.3", *calib], "expected unstructured, structured"),
        ([str(llama), "--sparsity", "0.5", "--calib", str(tmp_path / "empty.txt")], "is empty"),
        ([str(llama), "--sparsity", "0.5", *calib, "--recover-steps", "2", "--recover-method", "lora"],
         "fill in the zeros"),
        ([str(llama), "--pattern", "structured", "--sparsity", "0.1", "--drop-blocks", "1", *calib],
         "more than --sparsity"),
        ([str(tmp_path / "nowhere"), "--sparsity", "0.5", "--method", "magnitude"], "no such"),
        ([str(tmp_path / "classifier"), "--sparsity", "0.5", "--method", "magnitude"], "is a classifier"),
    ]
    for args, message in cases:
        assert main(["prune", *args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier", "empty.txt", "narrow"]
