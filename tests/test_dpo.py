"""DPO (lmforge.recipes.dpo, lmforge.train.preference, lmforge.data.preference): the loss and gradients of one
batch equal TRL's DPOTrainer on the same tiny Llama weights (sigmoid and IPO); the fused per-token
log-probabilities equal log-softmax; training raises the reward accuracy of the pairs it learns; self-play pairs;
bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.api import export
from lmforge.data.preference import collate_preferences, load_pairs
from lmforge.errors import UserError
from lmforge.models.layers import fused_linear_logprobs
from lmforge.train.checkpoint import save_checkpoint
from lmforge.train.preference import PreferenceLoss, reference_logprobs

PAIRS = [{"prompt": "Shall I compare thee", "chosen": " to a summer's day", "rejected": " to winter"},
         {"prompt": "Rough winds do shake", "chosen": " the darling buds of May", "rejected": " it"},
         {"prompt": "And every fair from fair", "chosen": " sometime declines", "rejected": " is fair and fair again"},
         {"prompt": "So long as men can breathe", "chosen": " or eyes can see", "rejected": " no"}]


def test_fused_token_logprobs_and_their_gradients_equal_log_softmax():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)
    ours = fused_linear_logprobs(h, w, targets, chunk_size=8)
    (ours * upstream).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference = torch.log_softmax(h2 @ w2.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, make_model):
    """A tiny Llama policy and a different reference, as lmforge checkpoints and Hugging Face exports."""
    root = tmp_path_factory.mktemp("dpo")
    for name, seed in (("policy", 3), ("reference", 4)):
        save_checkpoint(root / name, make_model("llama", block_size=64, seed=seed), tokenizer)
        export(root / name, root / f"{name}_hf")
    return root


def _trl_loss_and_grads(models: Path, loss: str, beta: float) -> tuple[float, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    policy = transformers.AutoModelForCausalLM.from_pretrained(models / "policy_hf", dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(models / "reference_hf", dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(models / "trl"), beta=beta, loss_type=[loss], report_to=[], use_cpu=True,
                         bf16=False, per_device_train_batch_size=len(PAIRS), max_length=None)  # fp32, as lmforge
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=transformers.AutoTokenizer.from_pretrained(models / "policy_hf"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    policy.train()
    value = trainer.compute_loss(policy, batch)
    value.backward()
    grads = {name: p.grad for name, p in policy.named_parameters()}
    layer = "model.layers.0."
    return float(value), {
        "tok_emb.weight": grads["model.embed_tokens.weight"],
        "blocks.0.attn.qkv.weight": torch.cat([grads[f"{layer}self_attn.{x}_proj.weight"] for x in "qkv"]),
        "blocks.0.mlp.up.weight": torch.cat([grads[f"{layer}mlp.{x}_proj.weight"] for x in ("gate", "up")]),
        "blocks.1.mlp.down.weight": grads["model.layers.1.mlp.down_proj.weight"],
        "norm.weight": grads["model.norm.weight"],
    }


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_trl_dpo_trainer(models, loss):
    from lmforge.sources import load

    beta = 0.1
    trl_loss, trl_grads = _trl_loss_and_grads(models, loss, beta)
    policy, reference = load(models / "policy"), load(models / "reference")
    tokenizer = policy.tokenizer
    pairs = reference_logprobs(reference, load_pairs(PAIRS, tokenizer, 64), 2, tokenizer.eos_id)
    policy.train()
    value = PreferenceLoss(beta, loss)(policy, collate_preferences(pairs, tokenizer.eos_id))
    value.backward()
    assert abs(float(value) - trl_loss) < 1e-5
    assert abs(trl_loss - (0.6931 if loss == "sigmoid" else 25.0)) > 1e-3  # the reference differs from the policy
    grads = dict(policy.named_parameters())
    for name, expected in trl_grads.items():
        torch.testing.assert_close(grads[name].grad, expected, atol=1e-5, rtol=1e-4, msg=name)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_training_raises_the_reward_accuracy_of_the_pairs_it_learns(models, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    run = _cli("dpo", str(models / "policy"), "--data", str(data), "--val-data", str(data), "--out", str(out),
               "--method", "full", "--train.max_steps", "25", "--train.lr", "3e-3", "--train.batch_size", "4",
               "--train.eval_interval", "25")
    assert run.returncode == 0, run.stderr[-2000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in evals if "reward_accuracy" in e][-1]
    assert final["reward_accuracy"] == 1.0 and final["margin"] > 0.5
    assert final["val_loss"] < 0.3 < 0.69  # below log 2, the loss before training (policy = reference)
    assert {"train_reward_accuracy", "train_margin", "chosen_nll"} <= set(final)
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["val_loss_before"] - 0.693147) < 1e-4
    assert "held-out reward accuracy 1.000" in run.stdout
    assert (out / "best").is_dir() and (out / "loss.png").stat().st_size > 0


def test_lora_dpo_in_python_trains_only_adapters_and_loads_back(models, tmp_path):
    import lmforge

    summary = lmforge.dpo(str(models / "policy"), PAIRS * 2, tmp_path / "lora", method="lora", loss="ipo",
                          beta=0.5, val_fraction=0.25, overrides={"train.max_steps": 3, "train.batch_size": 2})
    assert summary["step"] == 3 and "reward_accuracy" in summary
    tuned, base = lmforge.load(tmp_path / "lora" / "checkpoint"), lmforge.load(models / "policy")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.equal(tuned(ids), base(ids))  # the adapters changed the model
    assert torch.allclose(tuned.tok_emb.weight, base.tok_emb.weight)  # and nothing but them


def test_self_play_pairs_then_dpo_on_them(models, tmp_path):
    from lmforge.tasks.preference import make_pairs

    talks = [{"messages": [{"role": "user", "content": f"Say line {i}"},
                           {"role": "assistant", "content": text}]}
             for i, text in enumerate(["Shall I compare thee", "Rough winds do shake", "So long lives this",
                                       "Thou art more lovely", "And summer's lease", "Nor lose possession"])]
    counts = make_pairs(str(models / "policy"), _write(tmp_path / "chats.jsonl", talks), tmp_path / "pairs",
                        max_new_tokens=6, val_fraction=0.34)
    train = [json.loads(line) for line in (tmp_path / "pairs" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "pairs" / "heldout.jsonl").read_text().splitlines()]
    assert counts["train"] == len(train) == 4 and counts["heldout"] == len(held) == 2
    prompts = {p["prompt"][0]["content"] for p in train}
    assert not prompts & {p["prompt"][0]["content"] for p in held}  # held-out conversations kept apart
    for pair in train + held:
        assert pair["chosen"][0]["content"] in [t["messages"][1]["content"] for t in talks]
        assert pair["rejected"][0]["role"] == "assistant" and pair["rejected"] != pair["chosen"]
    run = _cli("dpo", str(models / "policy"), "--data", str(tmp_path / "pairs"), "--out", str(tmp_path / "run"),
               "--train.max_steps", "2", "--train.batch_size", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "4 pairs, 2 held out" in run.stderr


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "a", "chosen": " b"}, "pairs.jsonl:2: missing field(s) rejected"),
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, "pairs.jsonl:2: chosen and rejected are the same answer"),
    ({"prompt": "a", "chosen": "  ", "rejected": " b"}, "pairs.jsonl:2: the chosen answer is empty"),
    ({"prompt": "", "chosen": " c", "rejected": " b"}, "pairs.jsonl:2: the prompt is empty"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": " b", "rejected": " c"}, "pairs.jsonl:2: prompt, chosen"),
    ("{not json", "pairs.jsonl line 2: not valid JSON"),
])
def test_bad_pairs_are_one_line_errors_naming_the_line(models, tmp_path, record, expected):
    data = _write(tmp_path / "pairs.jsonl", [PAIRS[0], record])
    run = _cli("dpo", str(models / "policy"), "--data", str(data), "--out", str(tmp_path / "run"))
    assert run.returncode == 2 and expected in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "run").exists()


def test_bad_settings_and_another_tokenizers_reference_are_refused(models, tmp_path, make_model):
    from lmforge.tokenizer import train_tokenizer

    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    for flags, expected in ((["--beta", "0"], "--beta 0.0: expected a positive number"),
                            (["--beta", "-1"], "--beta -1.0: expected a positive number"),
                            (["--loss", "hinge"], "--loss = 'hinge'; expected one of sigmoid, ipo")):
        run = _cli("dpo", str(models / "policy"), "--data", str(data), "--out", str(tmp_path / "run"), *flags)
        assert run.returncode == 2 and expected in run.stderr, run.stderr
    other = train_tokenizer(["an entirely different corpus of words"] * 50, vocab_size=300, show_progress=False)
    save_checkpoint(tmp_path / "other", make_model("llama", block_size=64, vocab_size=300), other)
    run = _cli("dpo", str(models / "policy"), "--data", str(data), "--out", str(tmp_path / "run"),
               "--reference", str(tmp_path / "other"))
    assert run.returncode == 2 and "has another tokenizer" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="expected one of sigmoid, ipo"):
        PreferenceLoss(0.1, "hinge")
