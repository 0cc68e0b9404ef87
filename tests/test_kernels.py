"""Tests of lmforge.kernels: each kernel gives the plain layer's numbers (exactly, or within the rounding of
its dtype), goes in and out without touching parameters or state-dict keys, follows the off switch, and
is reported; the training and generation paths that apply them (Trainer, generate loop) agree with the
plain model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels, perf
from lmforge.errors import UserError
from lmforge.infer.generate import generate_ids
from lmforge.kernels import cpu, measure, remake
from lmforge.kernels.linear import FP32_MIN_ROWS, Fp32Linear, PackedLinear
from lmforge.kernels.measure import fp32_worth_it, packing_for
from lmforge.kernels.norm import lean_layer_norm, lean_rms_norm
from lmforge.kernels.swiglu import lean_swiglu
from lmforge.models.layers import layer_norm, rms_norm, swiglu

PACKINGS = [  # (weights' dtype, the op that multiplies through packed weights, tolerance)
    pytest.param(torch.float32, "mkl::_mkl_linear", 1e-5,
                 marks=pytest.mark.skipif(not cpu.mkl_packing(), reason="needs PyTorch built with MKL (x86 CPU)")),
    pytest.param(torch.bfloat16, "mkldnn::_linear_pointwise", 2**-7,
                 marks=pytest.mark.skipif(not cpu.onednn_bf16_packing(), reason="needs oneDNN and bf16 instructions")),
]


@pytest.fixture
def lively_model(make_model):
    """A random Llama-style model with an untied head and weights 3x the usual init (varied logits)."""
    model = make_model("llama", tie_embeddings=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_fp32_linear_multiplies_bf16_in_fp32_where_that_is_faster() -> None:
    """bf16 inputs and weights: the result of an fp32 multiply (exact products, fp32 sums) rounded to
    bf16 where the kernel applies (CPUs without AMX), close to it anywhere; gradients likewise; and
    PyTorch's own bf16 kernel for a few rows."""
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(48, 40)).to(torch.bfloat16)
    chosen = kernels.apply(model, for_="train")
    layer = model[0]
    assert isinstance(layer, Fp32Linear) == fp32_worth_it(layer.weight) == ("fp32_linear" in chosen["applied"])
    x = torch.randn(4, FP32_MIN_ROWS // 4, 48, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(4, FP32_MIN_ROWS // 4, 40, generator=g).bfloat16()
    out = layer(x)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    expected = x.detach().double() @ w.T + b
    assert out.dtype == torch.bfloat16
    # bf16 rounding (2**-8 relative) of fp32 sums of 48 exact products (rounded: ~48 * 2**-24 * sum|x*w|, sum < 5)
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=2e-5)
    assert (type(out.grad_fn).__name__ == "_LinearInFp32Backward") == isinstance(layer, Fp32Linear)  # the route
    out.backward(grad)
    rows_grad, rows_x = grad.double().reshape(-1, 40), x.detach().double().reshape(-1, 48)
    for got, want in ((x.grad, grad.double() @ w), (layer.weight.grad, rows_grad.T @ rows_x),
                      (layer.bias.grad, rows_grad.sum(0))):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=1e-2)
    few = x.detach()[:1, :3]  # 3 rows: converting the weight would cost more than it saves
    assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))


def test_lean_swiglu_keeps_only_its_input_and_gives_the_same_numbers() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 5, 2 * 24, generator=g, requires_grad=True)
    grad = torch.randn(3, 5, 24, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = lean_swiglu(swiglu)(h)
    assert len(saved) == 1 and saved[0] is h  # not silu(gate) besides
    out.backward(grad)
    h2 = h.detach().clone().requires_grad_()
    expected = swiglu(h2)
    expected.backward(grad)
    assert torch.equal(out, expected) and torch.equal(h.grad, h2.grad)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_keeps_only_its_input_and_gives_the_same_numbers(kind, dtype) -> None:
    """Output and gradients (x, weight, bias) of the plain norm, to the dtype's rounding; kept for the
    backward pass: x, per-row statistics and the parameters, nothing else as large as x."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 32, generator=g).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(32, generator=g)).to(dtype).requires_grad_()
    bias = torch.randn(32, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 32, generator=g).to(dtype)
    plain, args = (rms_norm, (weight, 1e-5)) if kind == "rmsnorm" else (layer_norm, (weight, bias, 1e-5))
    lean = lean_rms_norm(plain) if kind == "rmsnorm" else lean_layer_norm(plain)
    assert lean.kernel == "lean_norm" and lean.inner is plain
    results = []
    for fn in (lean, plain):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            out = fn(x, *args)
        out.backward(grad)
        tensors = (x, *args[:-1])
        results.append((out.detach(), *(t.grad for t in tensors)))
        for t in tensors:
            t.grad = None
        if fn is lean:
            assert saved[0] is x and all(t is x or t.numel() <= 2 * 15 or t is weight or t is bias for t in saved)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_layers_that_read_lean_outputs_keep_recipes_made_again_in_backward(make_model, monkeypatch) -> None:
    """Inside the model's forward pass (and only there) the linear layers that read a norm's output or
    the SwiGLU product keep a recipe, remade in the backward pass: at least 3 a block (qkv, up, down)."""
    model = make_model("llama", dropout=0.0).train()
    kernels.apply(model, for_="train")
    remade = []
    make_again = remake._Recipe.remake
    monkeypatch.setattr(remake._Recipe, "remake", lambda self: remade.append(1) or make_again(self))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    model(ids, ids).backward()
    assert len(remade) >= 3 * model.config.n_layer
    with torch.no_grad():
        model(ids)  # no autograd: nothing watched, nothing left behind
    assert remake._live.outputs is None and remake._live.stack == []
    block = model.blocks[0]
    remade.clear()
    x = torch.randn(2, 12, model.config.d_model, requires_grad=True)
    block(x, model.rope.cos_sin(torch.arange(12)[None], x.dtype)).sum().backward()  # outside the model's forward
    assert remade == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_kernels_train_like_the_plain_model(make_model, dtype, monkeypatch) -> None:
    """The same parameters and state-dict keys, and the same loss and gradients: to fp32 rounding in fp32
    (the lean SwiGLU and norms apply), within bf16 rounding in bf16 (where the fp32 route is set on,
    whatever this CPU's races say); `remove` gives the plain model back."""
    monkeypatch.setenv(kernels.SWITCH, "fp32_linear=on,fp32_attention=on,fp32_loss=on")
    plain = make_model("llama", dropout=0.0).to(dtype).train()
    model = make_model("llama", dropout=0.0).to(dtype).train()
    model.load_state_dict(plain.state_dict())
    parameters = dict(model.named_parameters())
    chosen = kernels.apply(model, for_="train")
    assert kernels.apply(model, for_="train")["applied"] == {}  # applied once only
    assert dict(model.named_parameters()) == parameters and model.state_dict().keys() == plain.state_dict().keys()
    assert chosen["applied"]["lean_swiglu"]["layers"] == [f"blocks.{i}.mlp" for i in range(model.config.n_layer)]
    norms = [f"blocks.{i}.norm{j}" for i in range(model.config.n_layer) for j in (1, 2)] + ["norm"]
    assert chosen["applied"]["lean_norm"]["layers"] == norms and remake.installed(model)
    if dtype == torch.float32 or not fp32_worth_it(model.head_weight):
        assert set(chosen["applied"]) == {"lean_swiglu", "lean_norm"} and chosen["skipped"]["fp32_linear"]
    else:
        assert set(chosen["applied"]) == {"fp32_linear", "fp32_attention", "fp32_loss", "lean_swiglu", "lean_norm"}
        assert len(chosen["applied"]["fp32_linear"]["layers"]) == len(linears(model))
        assert chosen["applied"]["fp32_loss"]["layers"] == [""]  # the model itself
    assert kernels.report(model)["applied"] == chosen["applied"]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=g)  # 96 rows: the fp32 route
    losses = []
    for m in (model, plain):
        loss = m(ids, ids)
        loss.backward()
        losses.append(loss)
    if dtype == torch.float32:  # fp32 rounding: the lean RMSNorm's backward sums in another order
        torch.testing.assert_close(losses[0], losses[1])
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    else:
        tolerance = 2**-6
        torch.testing.assert_close(losses[0], losses[1], rtol=tolerance, atol=tolerance)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            scale = q.grad.abs().max().item()
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=4 * tolerance * scale + 1e-9, msg=name)
    kernels.remove(model)
    assert kernels.report(model)["applied"] == {}
    assert all(type(m) is nn.Linear for m in linears(model)) and "sdpa" not in model.blocks[0].attn.__dict__
    assert model.blocks[0].mlp.swiglu is swiglu and model.blocks[0].norm1.rms_norm is rms_norm
    assert "rms_norm" not in model.blocks[0].norm1.__dict__ and not remake.installed(model)


@pytest.mark.parametrize("dtype, packed_op, tolerance", PACKINGS)
def test_packed_weights_give_the_same_logits_and_are_undone(lively_model, dtype, packed_op, tolerance,
                                                           monkeypatch) -> None:
    """fp32: the very same numbers (MKL packs); bf16: the same up to bf16 rounding (oneDNN packs). Every
    linear layer, the head among them, multiplies packed where packing is set on; where it is set off,
    none; by default, as this machine's race says."""
    monkeypatch.setenv(kernels.SWITCH, "packed_mkl=on,packed_onednn=on")
    model = lively_model.to(dtype)
    ids = torch.randint(0, 384, (3, 7), generator=torch.Generator().manual_seed(3))
    layers = linears(model)
    with torch.no_grad():
        expected = model(ids)
        with pytest.raises(RuntimeError, match="inside"):
            with kernels.generating(model, rows=3) as chosen:
                assert all(isinstance(m, PackedLinear) for m in layers) and isinstance(model.head, PackedLinear)
                kind = "packed_mkl" if dtype == torch.float32 else "packed_onednn"
                assert len(chosen["applied"][kind]["layers"]) == len(layers)
                assert kernels.report(model)["applied"] == chosen["applied"]
                with torch.profiler.profile() as profile:
                    got = model(ids)
                assert len([e for e in profile.events() if e.name == packed_op]) == len(layers)
                last = model(ids, last_only=True)
                raise RuntimeError("an error inside the block")
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance * scale)
    torch.testing.assert_close(last, expected[:, -1:], rtol=0, atol=tolerance * scale)
    assert not any(isinstance(m, PackedLinear) for m in layers)  # even after the error
    monkeypatch.setenv(kernels.SWITCH, "packed_mkl=off,packed_onednn=off")
    with kernels.generating(model, rows=3) as chosen:
        assert not isinstance(model.head, PackedLinear) and "LMFORGE_KERNELS" in chosen["skipped"]["packed"]
    monkeypatch.delenv(kernels.SWITCH)
    for rows in (1, 8):
        with kernels.generating(model, rows=rows) as chosen:
            packed = packing_for(model.head.weight, rows) is not None
            assert isinstance(model.head, PackedLinear) == packed and ("packed" in chosen["skipped"]) != packed


@pytest.mark.skipif(not cpu.mkl_packing(), reason="needs PyTorch built with MKL (x86 CPU)")
def test_weights_are_not_packed_where_the_copies_would_crowd_memory(lively_model, monkeypatch) -> None:
    """Packing is skipped when the copies would take more than half the memory still available."""
    assert 0 < cpu.available_memory() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = sum(m.weight.nbytes for m in linears(lively_model))
    monkeypatch.setenv(kernels.SWITCH, "packed_mkl=on")
    for available, packed in ((2 * size - 1, False), (2 * size, True)):
        monkeypatch.setattr(cpu, "available_memory", lambda available=available: available)
        with kernels.generating(lively_model, rows=3) as chosen:
            assert isinstance(lively_model.head, PackedLinear) == packed
            assert ("half the memory" in chosen["skipped"].get("packed", "")) != packed


@pytest.mark.skipif(not cpu.mkl_packing(), reason="needs PyTorch built with MKL (x86 CPU)")
def test_the_switch_turns_every_kernel_off(lively_model, monkeypatch) -> None:
    """LMFORGE_KERNELS=off, or enabled=False: nothing is swapped; enabled=True wins over the variable;
    generation with and without kernels gives the same tokens (fp32: packing is exact)."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    with_kernels = generate_ids(lively_model, prompts, 12, temperature=0)
    assert generate_ids(lively_model, prompts, 12, temperature=0, use_kernels=False) == with_kernels
    monkeypatch.setenv(kernels.SWITCH, "off")
    assert not kernels.switched_on() and not kernels.report()["enabled"]
    with kernels.generating(lively_model, rows=3) as chosen:
        assert chosen["applied"] == {} and "switched off" in chosen["skipped"]["all"]
        assert not any(isinstance(m, PackedLinear) for m in linears(lively_model))
    with kernels.generating(lively_model, rows=3, enabled=True) as chosen:
        assert chosen["enabled"] and "all" not in chosen["skipped"]
        assert isinstance(lively_model.head, PackedLinear) == (packing_for(lively_model.head.weight, 3) is not None)
    assert generate_ids(lively_model, prompts, 12, temperature=0) == with_kernels


def test_report_names_the_hardware_and_the_rules() -> None:
    report = kernels.report()
    assert report["enabled"] is True and report["switch"] == "LMFORGE_KERNELS="
    assert set(report["hardware"]) >= {"amx", "mkl_packing", "onednn_packing", "onednn_bf16_packing", "torch"}
    assert set(report["rules"]) == {"fp32_linear", "fp32_attention", "fp32_loss", "lean_swiglu", "lean_norm",
                                    "lora_dropout", "packed_mkl", "packed_onednn"}
    with pytest.raises(ValueError, match="expected 'train' or 'generate'"):
        kernels.apply(nn.Linear(2, 2), for_="serve")


@pytest.mark.parametrize("kernel, dtype, rows", measure.runnable())
def test_each_race_runs_on_tiny_shapes_and_its_verdict_follows_the_timings(kernel, dtype, rows) -> None:
    """The real micro-benchmark of each kernel this machine can run, on tiny shapes: both ways are timed,
    and the kernel is used exactly where it won by the margin."""
    ms = measure.race(kernel, dtype, rows or 1, tiny=True)
    assert set(ms) == {"plain", "kernel", *(["pack"] if kernel.startswith("packed") else [])}
    assert all(0 < t < 1000 for t in ms.values())
    verdict = measure.verdict(kernel, dtype, rows, tiny=True)
    assert verdict.use == (verdict.ms["plain"] >= (1 + measure.MARGIN) * verdict.ms["kernel"])
    assert f"{verdict.ms['plain'] / verdict.ms['kernel']:.2f}x" in verdict.why


def test_the_decision_rule_uses_a_kernel_only_where_it_wins_by_the_margin() -> None:
    cases = {(10.0, 9.0): True, (10.0, 9.7): False, (10.0, 10.0): False, (10.0, 20.0): False, (10.0, 2.5): True}
    for (plain, kernel), used in cases.items():
        verdict = measure.decide("packed_mkl", "float32, 8 rows", {"plain": plain, "kernel": kernel})
        assert verdict.use == used, (plain, kernel)
        assert f"{plain / kernel:.2f}x" in verdict.why and f"{kernel:.2f} ms against {plain:.2f} ms" in verdict.why
    assert measure.decide("k", "c", {"plain": 10.0, "kernel": 9.6}, margin=0.02).use
    packing = {"plain": 10.0, "kernel": 9.0, "pack": 50.0}  # 1 ms a step saved: packing pays back after 50 steps
    assert measure.decide("packed_mkl", "c", packing).use and measure.decide("packed_mkl", "c", packing, steps=50).use
    short = measure.decide("packed_mkl", "c", packing, steps=49)
    assert not short.use and "pays back after 50 steps, more than this call's 49" in short.why


def test_races_are_run_once_per_machine_and_read_back_from_the_cache(tmp_path, monkeypatch) -> None:
    """perf.measured: one measurement per key and machine; another thread count is another machine;
    remeasure and forget measure again; a measurement that other processes disturbed is not kept. A
    verdict comes from the cached timings: timings written into the cache decide it."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(perf, "MAX_OTHER_CORES", float("inf"))  # whatever else runs on this machine
    calls = []

    def count() -> float:
        calls.append(1)
        return float(len(calls))

    assert perf.measured("x", count) == 1.0 and perf.measured("x", count) == 1.0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert perf.measured("x", count) == 2.0  # another machine id
    finally:
        torch.set_num_threads(threads)
    assert perf.measured("x", count) == 1.0 and perf.measured("x", count, remeasure=True) == 3.0
    perf.forget()
    assert perf.measured("x", count) == 4.0
    monkeypatch.setattr(perf, "MAX_OTHER_CORES", -1.0)  # every measurement counts as disturbed
    assert perf.measured("y", count) == 5.0 and perf.measured("y", count) == 5.0 and "y" in perf.disturbed
    assert "y" not in perf.read_cache()["measured"] and perf.measured("x", count) == 4.0
    perf.known.clear()  # as a new process sees it
    assert perf.measured("y", count) == 6.0
    monkeypatch.setattr(perf, "MAX_OTHER_CORES", float("inf"))
    key = "kernel/fp32_loss/bfloat16"
    for timings, used in (({"plain": 10.0, "kernel": 5.0}, True), ({"plain": 5.0, "kernel": 10.0}, False)):
        perf.measured(key, lambda timings=timings: timings, remeasure=True)
        assert measure.verdict("fp32_loss", torch.bfloat16).use == used
        assert fp32_worth_it(torch.ones(2, 2, dtype=torch.bfloat16), "fp32_loss") == used
        assert not fp32_worth_it(torch.ones(2, 2), "fp32_loss")  # fp32 weights: nothing to upcast
    assert key in perf.read_cache()["measured"]


def test_lmforge_kernels_sets_a_kernel_on_or_off(monkeypatch) -> None:
    monkeypatch.setenv(kernels.SWITCH, "fp32_linear=on, packed_mkl=off")
    assert measure.verdict("fp32_linear", torch.bfloat16).use
    assert not measure.verdict("packed_mkl", torch.float32, 8).use
    assert "set on by LMFORGE_KERNELS" in measure.verdict("fp32_linear", torch.bfloat16).why
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert "fp32_linear" in kernels.apply(model, for_="train")["applied"] and isinstance(model[0], Fp32Linear)
    monkeypatch.setenv(kernels.SWITCH, "fp32_linear=off")
    assert not measure.verdict("fp32_linear", torch.bfloat16).use
    for wrong in ("fp32_linear=maybe", "turbo=on"):
        monkeypatch.setenv(kernels.SWITCH, wrong)
        with pytest.raises(UserError, match="is not KERNEL=on|off|auto"):
            measure.verdict("fp32_linear", torch.bfloat16)


def test_lmforge_env_shows_the_measurements_and_the_kernel_for_each_job(tmp_path) -> None:
    """`lmforge env --json`: the hardware, measured peaks and bandwidth, `auto` precision and every race's
    verdict, measured into the cache it names; the text form lists each job; a set kernel shows as set."""
    import json
    import subprocess
    import sys

    environ = {**os.environ, "LMFORGE_CACHE": str(tmp_path), "LMFORGE_KERNELS": "fp32_loss=off"}
    run = subprocess.run([sys.executable, "-m", "lmforge", "env", "--json"], capture_output=True, text=True,
                         env=environ, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["hardware"]["cores"] >= 1 and report["hardware"]["torch"] == torch.__version__
    assert all(v > 0 for v in report["measured"]["matmul_peak_gflops"].values())
    assert report["measured"]["memory_bandwidth_gbs"] > 0 and report["precision_auto"] in ("bf16", "fp32")
    assert [(v["kernel"], v["case"]) for v in report["kernels"]] == [
        (k, measure.case_of(k, d, r)) for k, d, r in measure.runnable()]
    loss = next(v for v in report["kernels"] if v["kernel"] == "fp32_loss")
    assert loss["use"] is False and loss["why"] == "set off by LMFORGE_KERNELS"
    assert Path(report["cache"]).parent.parent == tmp_path
    kept = json.loads(Path(report["cache"]).read_text())["measured"] if Path(report["cache"]).is_file() else {}
    quantized = {v["case"] for v in report["quantized"]}  # int4 and int8 layers at 1, 8 and prompt rows
    assert len(quantized) == 6 and all(v["kernel"] in v["ms"] for v in report["quantized"])
    # peaks, bandwidth, races
    assert len(kept) + len(report["disturbed"]) == 3 + len(report["kernels"]) - 1 + len(quantized)
    assert not set(kept) & set(report["disturbed"])
    text = subprocess.run([sys.executable, "-m", "lmforge", "env"], capture_output=True, text=True,
                          env=environ, timeout=120).stdout
    assert "matmul bf16" in text and "--train.precision auto ->" in text and "training, bf16" in text
    assert "int4 (g32) layers, 1 row" in text
