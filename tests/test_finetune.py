"""Fine-tuning, full and LoRA, through the one Trainer: the loss goes down, the best checkpoint is kept,
LoRA trains only its adapters and merges into the same model, chat answers, and bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import UserError
from lmforge.recipes.finetune import finetune

WORDS = "king queen river garden night song bird forest".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny pretrained model (a real tokenizer, shards and a short pretraining run)."""
    root = tmp_path_factory.mktemp("ft")
    text = " ".join(f"the {a} and the {b}." for a in WORDS for b in WORDS) * 3
    (root / "a.txt").write_text(text)
    (root / "b.txt").write_text(text[::-1])
    lmforge.prepare(str(root / "*.txt"), root / "data", vocab_size=300, clean=False)  # repetitive on purpose
    lmforge.pretrain(root / "data", root / "run", preset="tiny",
                     overrides={"model.block_size": 64, "train.max_steps": 10, "train.eval_interval": 10,
                                "train.eval_batches": 1, "train.precision": "fp32"})
    return root


@pytest.fixture(scope="module")
def chats(base) -> Path:
    path = base / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            word = WORDS[i % len(WORDS)]
            messages = [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": f"{word}!"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_full_finetune_lowers_validation_loss_and_keeps_the_best(base, chats, capsys):
    out = base / "full"
    summary = finetune(base / "run", chats, out, method="full", epochs=4,
                       overrides={"train.lr": 3e-3, "train.batch_size": 4, "train.precision": "fp32"})
    assert summary["best_val_loss"] < summary["val_loss_before"] - 0.5
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch")]
    assert [line.split(":")[0] for line in lines] == ["Epoch 1", "Epoch 2", "Epoch 3", "Epoch 4"]
    assert all("train loss" in line and "val loss" in line for line in lines)
    best = json.loads((out / "best" / "lmforge.json").read_text())
    assert best["val_loss"] == summary["best_val_loss"]
    # the fine-tuned model keeps the chat template it was trained with
    model = lmforge.load(out)
    assert model.tokenizer.chat_template is not None


def test_lora_trains_only_adapters_and_merges_to_the_same_model(base, chats):
    out = base / "lora"
    summary = finetune(base / "run", chats, out, method="lora", epochs=3, lora_rank=4,
                       overrides={"train.lr": 1e-2, "train.batch_size": 4, "train.precision": "fp32"})
    assert summary["best_val_loss"] < summary["val_loss_before"]
    checkpoint = out / "best"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    adapter_bytes = (checkpoint / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (base / "run" / "checkpoint" / "model.safetensors").stat().st_size / 4

    merged_dir = lmforge.merge(out, base / "merged")
    ids = torch.tensor([lmforge.load(base / "run").tokenizer.encode("say queen")])
    with torch.no_grad():
        from_adapter = lmforge.load(out)(ids)
        merged = lmforge.load(merged_dir)(ids)
        original = lmforge.load(base / "run")(ids)
    torch.testing.assert_close(merged, from_adapter, atol=1e-5, rtol=1e-5)
    assert (merged - original).abs().max() > 1e-3  # the adapters changed the model


def test_resumed_lora_run_continues_exactly(base, chats):
    settings = {"train.lr": 1e-2, "train.batch_size": 4, "train.precision": "fp32", "train.eval_interval": 3}
    finetune(base / "run", chats, base / "lora-a", method="lora", epochs=None, lora_rank=4,
             overrides={**settings, "train.max_steps": 6})
    from lmforge.train.checkpoint import load_trainer_state

    state = load_trainer_state(base / "lora-a" / "checkpoint")
    assert state["step"] == 6 and "trainable" in state
    assert all(value.dtype == torch.float32 for value in state["trainable"].values())


def test_chat_answers_one_message(base, chats):
    r = run_cli("chat", str(base / "full"), "--message", "say river", "--temperature", "0",
                "--max-new-tokens", "5", cwd=base)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@pytest.mark.parametrize("record, fragment", [
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "role 'wizard'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
])
def test_bad_chat_data_is_refused_naming_the_line(base, record, fragment):
    path = base / f"bad-{fragment[:4]}.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps(record) + "\n")
    r = run_cli("finetune", "run", str(path), "--out", "never", cwd=base)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert fragment in r.stderr and ":2" in r.stderr
    assert not (base / "never").exists()


def test_unknown_lora_targets_name_the_real_layers(base, chats):
    with pytest.raises(UserError, match="q_proj.*linear layers are: .*qkv"):
        finetune(base / "run", chats, base / "never", method="lora", lora_targets=["q_proj"])
    assert not (base / "never").exists()


def test_merge_refuses_a_checkpoint_without_adapters(base):
    with pytest.raises(UserError, match="no LoRA adapters"):
        lmforge.merge(base / "run", base / "never")


def test_finetune_refuses_to_write_over_a_run(base, chats):
    before = (base / "full" / "best" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        finetune(base / "run", chats, base / "full")
    assert (base / "full" / "best" / "model.safetensors").read_bytes() == before


def test_a_transformers_model_without_a_native_port_finetunes_with_the_same_trainer(base, chats):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = lmforge.load(base / "run").tokenizer
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    hf_dir = base / "neox"
    GPTNeoXForCausalLM(config).save_pretrained(hf_dir)
    tokenizer.save(hf_dir)
    summary = finetune(hf_dir, chats, base / "neox-ft", method="lora", epochs=2,
                       overrides={"train.lr": 1e-2, "train.batch_size": 4, "train.precision": "fp32"})
    assert summary["best_val_loss"] < summary["val_loss_before"]
    full = finetune(hf_dir, chats, base / "neox-full", method="full", epochs=2,
                    overrides={"train.lr": 3e-3, "train.batch_size": 4, "train.precision": "fp32"})
    assert full["best_val_loss"] < full["val_loss_before"]
    reloaded = AutoModelForCausalLM.from_pretrained(base / "neox-full" / "best")  # transformers' own format
    ids = torch.tensor([tokenizer.encode("say king")])
    assert reloaded(ids).logits.shape == (1, ids.shape[1], tokenizer.vocab_size)
