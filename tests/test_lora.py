"""LoRA's memory-light dropout (the kernel lmforge.kernels.lora_dropout, which the Trainer applies): the
same training as peft's dropout with the same masks, no copy of the adapted layers' inputs kept, masks of
the right rate, reproducible steps; and the same training as plain peft with kernels off."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lmforge.kernels.lora_dropout as lora
from lmforge import kernels
from lmforge.config import TrainConfig
from lmforge.models.decoder import Decoder
from lmforge.recipes.finetune import apply_lora
from lmforge.train.objectives import RandomWindows, causal_lm_loss
from lmforge.train.trainer import Trainer


def lora_for_training(model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """LoRA adapters on the model, with the training kernels the Trainer would apply."""
    model = apply_lora(model, rank=rank, alpha=alpha, dropout=dropout)
    kernels.apply(model, for_="train")
    return model


def randomise_adapters(model: nn.Module, seed: int) -> None:
    """peft starts B at zero (no gradient reaches A); random adapters make every gradient count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of the distinct tensors the forward pass keeps for the backward pass (parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, batch)
    return sum(kept.values())


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 384, (3, 17), generator=g)
    targets = torch.randint(0, 384, (3, 17), generator=g)
    targets[0, :5] = -100
    return {"ids": ids, "targets": targets}


def test_fused_dropout_trains_as_peft_dropout_with_the_same_masks(make_model, batch, monkeypatch) -> None:
    base = make_model("llama")
    torch.manual_seed(1)
    fused = lora_for_training(copy.deepcopy(base), rank=4, alpha=8, dropout=0.3)
    assert sum(isinstance(m, lora.DropoutLinear) for m in fused.modules()) == 2 * 4  # 2 blocks, 4 targets
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                              target_modules=["qkv", "proj", "up", "down"]))
    randomise_adapters(fused, 0)
    randomise_adapters(reference, 0)

    masks: list[tuple[torch.Tensor, float]] = []  # the fused model's masks, in the order the forward draws them
    seen: set[int] = set()
    draw = lora.keep_mask

    def recording(shape, p, seed, device, dtype=torch.bool):
        keep, scale = draw(shape, p, seed, device, dtype)
        if seed not in seen:  # the backward pass draws the same mask again
            seen.add(seed)
            masks.append((keep, scale))
        return keep, scale

    monkeypatch.setattr(lora, "keep_mask", recording)
    fused.train()
    loss = causal_lm_loss(fused, batch)
    loss.backward()
    assert len(masks) == 8
    assert all(0.5 < keep.float().mean() < 0.9 for keep, _ in masks)

    replay = iter(masks)

    class Replayed(nn.Module):  # the fused model's mask, applied as autograd's dropout would
        def forward(self, x):
            if not self.training:
                return x
            keep, scale = next(replay)
            return x * keep * scale

    for module in reference.modules():
        if hasattr(module, "lora_dropout") and isinstance(module.lora_dropout, nn.ModuleDict):
            module.lora_dropout["default"] = Replayed()
    reference.train()
    expected = causal_lm_loss(reference, batch)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    grads = dict(reference.named_parameters())
    n = 0
    for name, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
            n += 1
    assert n == 16
    # in eval mode there is no dropout: the plain adapters
    fused.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(batch["ids"]), reference(batch["ids"]))


def test_fused_dropout_keeps_no_copy_of_the_inputs(make_model, batch) -> None:
    """With dropout, a LoRA step keeps what it keeps without dropout: no masks, no dropped copies."""
    kept = {}
    for p in (0.0, 0.1):
        model = lora_for_training(make_model("llama"), rank=4, alpha=8, dropout=p).train()
        kept[p] = saved_bytes(model, batch)
    assert kept[0.1] == kept[0.0]


def test_keep_mask_rate_scale_and_seed() -> None:
    keep, scale = lora.keep_mask(torch.Size([1000, 1000]), 0.05, seed=7, device=torch.device("cpu"))
    assert keep.shape == (1000, 1000) and keep.dtype == torch.bool
    kept = keep.float().mean().item()
    assert abs((1 - kept) - 0.05) < 0.002
    assert scale == pytest.approx(1 / (1 - round(0.05 * 65536) / 65536))
    assert abs(kept * scale - 1) < 0.003  # unbiased
    again, _ = lora.keep_mask(torch.Size([1000, 1000]), 0.05, seed=7, device=torch.device("cpu"))
    other, _ = lora.keep_mask(torch.Size([1000, 1000]), 0.05, seed=8, device=torch.device("cpu"))
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    as_float, _ = lora.keep_mask(torch.Size([1000, 1000]), 0.05, seed=7, device=torch.device("cpu"),
                                 dtype=torch.float32)
    assert torch.equal(as_float, keep.float())
    # a shape that is not a multiple of 4 elements (the generator makes 64 bits at a time)
    odd, _ = lora.keep_mask(torch.Size([3, 5]), 0.5, seed=1, device=torch.device("cpu"))
    assert odd.shape == (3, 5) and 0 < odd.sum() < 15


def test_fused_lora_dropout_with_activation_checkpointing_trains_the_same(tokenizer, make_config,
                                                                          tmp_path) -> None:
    """Recomputing the blocks draws the same dropout masks again (the seeds come from torch's state)."""
    tokens = np.array(tokenizer.encode("the cat sat on the mat, and the dog sat on the log. " * 40))
    losses, weights = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_lora(Decoder(make_config("llama", vocab_size=tokenizer.vocab_size)), 4, 8, 0.2)
        randomise_adapters(model, 1)
        config = TrainConfig(batch_size=4, max_steps=3, lr=1e-2, warmup_steps=0, precision="fp32",
                             eval_interval=100, activation_checkpointing=checkpointing)
        trainer = Trainer(model, config, tmp_path / str(checkpointing), RandomWindows(tokens, 32, 4, seed=0))
        losses[checkpointing] = []
        for step in range(3):
            trainer.step = step
            losses[checkpointing].append(trainer.train_step())
        weights[checkpointing] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)
    assert len(set(losses[True])) == 3
    for a, b in zip(weights[True], weights[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fused_lora_dropout_trains_in_reduced_precision(tokenizer, make_config, tmp_path, precision) -> None:
    """bf16 weights, or fp16 autocast (whose matmuls run in fp16 on fp32 weights and inputs)."""
    tokens = np.array(tokenizer.encode("the cat sat on the mat, and the dog sat on the log. " * 40))
    torch.manual_seed(0)
    model = apply_lora(Decoder(make_config("llama", vocab_size=tokenizer.vocab_size)), 4, 8, 0.2)
    randomise_adapters(model, 1)
    before = [p.detach().float().clone() for p in model.parameters() if p.requires_grad]
    config = TrainConfig(batch_size=4, max_steps=2, lr=1e-2, warmup_steps=0, precision=precision, eval_interval=100)
    trainer = Trainer(model, config, tmp_path / precision, RandomWindows(tokens, 32, 4, seed=0))
    losses = [trainer.train_step(), trainer.train_step()]
    assert all(np.isfinite(losses))
    after = [p.detach().float() for p in model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # every adapter trained


def test_kernels_off_trains_with_peft_own_dropout(tokenizer, make_config, tmp_path, monkeypatch) -> None:
    """LMFORGE_KERNELS=off: the Trainer leaves peft's modules as they are (and their dropout trains)."""
    from peft import LoraConfig, get_peft_model

    tokens = np.array(tokenizer.encode("the cat sat on the mat, and the dog sat on the log. " * 40))
    monkeypatch.setenv(kernels.SWITCH, "off")
    torch.manual_seed(0)
    adapters = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["qkv", "proj", "up", "down"])
    model = get_peft_model(Decoder(make_config("llama", vocab_size=tokenizer.vocab_size)), adapters)
    config = TrainConfig(batch_size=4, max_steps=2, lr=1e-2, warmup_steps=0, precision="fp32", eval_interval=100)
    trainer = Trainer(model, config, tmp_path / "off", RandomWindows(tokens, 32, 4, seed=0))
    assert trainer.kernels["skipped"] == {"all": "switched off (LMFORGE_KERNELS=off or enabled=False)"}
    assert not any(isinstance(m, lora.DropoutLinear) for m in model.modules())
    assert np.isfinite(trainer.train_step())
    monkeypatch.delenv(kernels.SWITCH)
    assert kernels.apply(model, for_="train")["applied"]["lora_dropout"]["layers"]  # on again: fused
    kernels.remove(model)
    assert not any(isinstance(m, lora.DropoutLinear) for m in model.modules())
    assert sum(isinstance(d, nn.Dropout) for m in model.modules() for d in getattr(m, "lora_dropout", {}).values()) \
        == 2 * 4
