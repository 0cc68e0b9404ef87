"""Devices: one rule for `--device` / `train.device`, tensors that follow the model's device, and
checkpoints that load on any device.

Without a GPU, three things stand in for one, honestly:
- the CPU named explicitly (`--device cpu`) on real tiny runs of a training verb and of generate;
- PyTorch's `meta` device as the *default* device while the model sits on the CPU: any tensor the
  generate loop, beam search, the VAE or the Trainer makes without saying where lands on `meta`, and
  mixing it with the model's tensors fails at once. So these tests catch exactly the mistake that on
  a GPU is a device mismatch (or a silent host-device copy every step);
- a checkpoint whose trainer_state.pt is tagged `cuda:0`, as a CUDA run writes it (torch's own
  serializer, told the storage lives on cuda:0), resumed on the CPU.
The tests marked `gpu` run the real thing and are skipped without CUDA (bench/gpu_smoke.sh runs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file

import lmforge
from lmforge.config import ModelConfig, TrainConfig
from lmforge.devices import resolve_device
from lmforge.errors import UserError
from lmforge.infer.beam import beam_search_ids
from lmforge.models import build_model
from lmforge.models.decoder import Decoder
from lmforge.tasks import vae as vae_tasks
from lmforge.train.checkpoint import load_checkpoint, read_info, save_checkpoint
from lmforge.train.objectives import RandomWindows, evaluate_tokens
from lmforge.train.trainer import Trainer

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SPELLING = "expected auto, cpu, cuda, cuda:N or mps"


def lmforge_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# ----------------------------------------------------------------------------------------------
# the rule


def test_device_names_resolve_or_fail_in_one_line(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(cpu) == cpu
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    expected = torch.device("cuda", 0) if CUDA else torch.device("mps") if mps else torch.device("cpu")
    assert resolve_device("auto") == resolve_device() == expected
    for bad in ("banana", "cuda:x", "cpu:0", "mps:1", "", "cuda:-1", "meta"):
        with pytest.raises(UserError, match=SPELLING) as error:
            resolve_device(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="train.device = 'banana'"):
        TrainConfig(device="banana").validate()
    assert TrainConfig(device="cuda:1").validate().device == "cuda:1"  # the spelling: checked without a GPU
    if not CUDA:
        for name in ("cuda", "cuda:0", "cuda:7"):
            with pytest.raises(UserError, match=f"--device = {name}, but .*(without CUDA|no CUDA GPU).*use --device"):
                resolve_device(name)
    elif GPUS < 8:
        with pytest.raises(UserError, match=f"this machine has {GPUS} CUDA GPU"):
            resolve_device("cuda:7")
    if not mps:
        with pytest.raises(UserError, match="no Apple GPU"):
            resolve_device("mps")


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    if not CUDA:
        assert resolve_device("auto") == torch.device("cpu")  # gloo on the CPU (never mps under torchrun)
        return
    if GPUS >= 2:
        assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:1") == torch.device("cuda", 1)
    else:
        with pytest.raises(UserError, match="start at most 1 processes per node"):
            resolve_device("auto")
    with pytest.raises(UserError, match="LOCAL_RANK"):
        resolve_device("cuda:0")


# ----------------------------------------------------------------------------------------------
# the command line: --device on a training verb and on generate; mistakes


@pytest.fixture(scope="module")
def cpu_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lmforge pretrain ... --device cpu`: a real, tiny run."""
    root = tmp_path_factory.mktemp("device")
    r = lmforge_cli("pretrain", "--data", str(shards), "--out", "run", "--preset", "tiny", "--model.block_size", "32",
                    "--train.max_steps", "4", "--train.eval_interval", "2", "--train.eval_batches", "1",
                    "--train.warmup_steps", "1", "--train.precision", "fp32", "--device", "cpu", cwd=root)
    assert r.returncode == 0, r.stderr
    return root / "run"


def test_a_training_verb_and_generate_on_an_explicit_cpu(cpu_run: Path) -> None:
    assert yaml.safe_load((cpu_run / "run.yaml").read_text())["train"]["device"] == "cpu"
    assert read_info(cpu_run)["train"]["device"] == "cpu"
    assert [json.loads(line)["step"] for line in (cpu_run / "metrics.jsonl").read_text().splitlines()][-1] == 4
    r = lmforge_cli("generate", str(cpu_run), "--prompt", "Shall I", "--max-new-tokens", "12", "--temperature", "0",
                    "--device", "cpu", cwd=cpu_run.parent)
    assert r.returncode == 0, r.stderr
    expected = lmforge.generate(cpu_run, "Shall I", device="cpu", max_new_tokens=12, temperature=0)[0]
    assert r.stdout == "Shall I" + expected + "\n" and expected


@pytest.mark.parametrize("args, fragment", [
    (["pretrain", "--data", "{shards}", "--out", "new", "--device", "banana"], f"train.device = 'banana'; {SPELLING}"),
    (["pretrain", "--data", "{shards}", "--out", "new", "--train.device", "cuda:7"], "train.device = cuda:7, but"),
    (["finetune", "{run}", "{text}", "--out", "new", "--device", "cuda:7"], "train.device = cuda:7, but"),
    (["generate", "{run}", "--prompt", "x", "--device", "banana"], f"--device = 'banana'; {SPELLING}"),
    (["generate", "{run}", "--prompt", "x", "--device", "cuda:7"], "--device = cuda:7, but"),
    (["eval", "{run}", "--task", "lm", "--data", "{text}", "--out", "new", "--device", "cuda:7"],
     "--device = cuda:7, but"),
], ids=lambda a: " ".join(a[:1] + a[-2:]) if isinstance(a, list) else "")
def test_a_device_that_is_not_there_is_one_line_and_nothing_is_written(args, fragment, cpu_run, shards,
                                                                        tmp_path) -> None:
    if GPUS > 7 and "cuda:7" in args:
        pytest.skip("this machine has a cuda:7")
    (tmp_path / "text.txt").write_text("Shall I compare thee to a summer's day?\n" * 20)
    args = [a.format(shards=shards, run=cpu_run, text=tmp_path / "text.txt") for a in args]
    r = lmforge_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert fragment in r.stderr and r.stderr.startswith(f"lmforge {args[0]}: error:"), r.stderr
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------
# tensors follow the model's device (the meta device as the default catches any that do not)


@pytest.fixture
def no_cpu_kernels(monkeypatch):
    """The CPU kernels (lmforge.kernels) are not what runs on a GPU, and they measure themselves on first
    use: off, so that these tests look at the loops themselves."""
    monkeypatch.setenv("LMFORGE_KERNELS", "off")


def test_generation_makes_its_tensors_on_the_models_device(tokenizer, no_cpu_kernels) -> None:
    torch.manual_seed(0)
    decoder = Decoder(tiny_config("llama", vocab_size=tokenizer.vocab_size)).eval()
    decoder.tokenizer = tokenizer
    seq2seq = build_model(tiny_config("gpt2", vocab_size=tokenizer.vocab_size, kind="seq2seq",
                                      n_encoder_layer=1)).eval()
    seq2seq.tokenizer = tokenizer
    vae = build_model(ModelConfig(kind="vae", vocab_size=tokenizer.vocab_size, block_size=24, n_layer=2,
                                  n_encoder_layer=1, n_head=2, d_model=32, latent_dim=8)).eval()
    vae.tokenizer = tokenizer
    prompts = ["Shall I compare", "Thou art"]
    runs = {
        "sampling": lambda: decoder.generate(prompts, max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9,
                                             repetition_penalty=1.3, seed=3, num_samples=2),
        "stop and stream": lambda: decoder.generate("Shall", max_new_tokens=12, temperature=0, stop=["e"],
                                                    stream=lambda piece: None),
        "past the context": lambda: decoder.generate("Shall", max_new_tokens=40, temperature=0),
        "beam search": lambda: seq2seq.generate(prompts, max_new_tokens=8, beam_size=3),
        "beam ids": lambda: beam_search_ids(decoder, [[5, 6, 7], [8]], 2, 6, eos_id=tokenizer.eos_id),
        "vae sample": lambda: vae_tasks.sample(vae, num_samples=2, max_new_tokens=6, temperature=1.0, seed=1),
        "vae reconstruct": lambda: vae_tasks.reconstruct(vae, prompts, max_new_tokens=6),
    }
    for name, run in runs.items():
        expected = run()
        with torch.device("meta"):
            assert run() == expected, name


def tiny_trainer(out: Path, tokenizer, max_steps: int = 6, device: str = "cpu", **train) -> Trainer:
    """A Trainer of a tiny decoder on repetitive text (the same model and batches every time)."""
    tokens = np.array(tokenizer.encode("Shall I compare thee to a summer's day? Thou art more lovely. " * 30))
    torch.manual_seed(0)
    model = Decoder(tiny_config("gpt2", vocab_size=tokenizer.vocab_size))
    config = TrainConfig(batch_size=4, max_steps=max_steps, eval_interval=3, warmup_steps=1, lr=3e-3, log_interval=1,
                         device=device, **{"precision": "fp32", **train})
    return Trainer(model, config, out, RandomWindows(tokens, 32, 4, seed=0),
                   lambda m: {"val_loss": evaluate_tokens(m, tokens[:300], 32)["loss"]}, tokenizer=tokenizer)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_training_makes_its_tensors_on_the_models_device(tokenizer, tmp_path, no_cpu_kernels) -> None:
    expected = tiny_trainer(tmp_path / "plain", tokenizer, max_steps=4, grad_accum=2).fit()
    trainer = tiny_trainer(tmp_path / "meta", tokenizer, max_steps=4, grad_accum=2)  # the model: on the CPU
    with torch.device("meta"):
        got = trainer.fit()
    assert {k: v for k, v in got.items() if k != "train_seconds"} == \
        {k: v for k, v in expected.items() if k != "train_seconds"}
    assert losses(tmp_path / "meta") == losses(tmp_path / "plain")


# ----------------------------------------------------------------------------------------------
# checkpoints load on any device


def test_a_checkpoint_written_by_a_cuda_run_resumes_on_the_cpu(tokenizer, tmp_path, monkeypatch) -> None:
    full = tmp_path / "full"
    tiny_trainer(full, tokenizer).fit()  # checkpoints at steps 3 and 6: step 3 stays in checkpoint.prev/
    step3 = full / "checkpoint.prev"
    assert read_info(step3)["step"] == 3
    run = tmp_path / "from-cuda"
    run.mkdir()
    shutil.copy(full / "metrics.jsonl", run / "metrics.jsonl")
    state = torch.load(step3 / "trainer_state.pt", weights_only=True)
    model = load_checkpoint(step3)
    with monkeypatch.context() as m:  # what a CUDA run writes: every tensor's storage tagged cuda:0
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(run / "checkpoint", model, info=read_info(step3), trainer_state=state)
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really is a CUDA one: plain torch.load fails
            torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    summary = tiny_trainer(run, tokenizer).fit(resume=True)
    assert summary["step"] == 6
    assert losses(run) == losses(full)
    a, b = load_file(full / "checkpoint" / "model.safetensors"), load_file(run / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    moved = lmforge.load(run, device="cpu")
    assert all(p.device.type == "cpu" for p in moved.parameters())


# ----------------------------------------------------------------------------------------------
# on a GPU (skipped without CUDA; bench/gpu_smoke.sh runs them)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_training_is_on_the_gpu_in_bf16_with_fused_adamw(tokenizer, tmp_path, compiled) -> None:
    trainer = tiny_trainer(tmp_path / "run", tokenizer, device="auto", precision="auto", compile=compiled)
    assert trainer.dist.device == torch.device("cuda", 0)
    assert trainer.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert trainer.optimizer.defaults["fused"]
    assert all(p.is_cuda for p in trainer.model.parameters())
    summary = trainer.fit()
    assert summary["step"] == 6 and np.isfinite(summary["val_loss"])
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]
    on_cpu = lmforge.load(tmp_path / "run", device="cpu")  # a checkpoint written on the GPU, read on the CPU
    on_gpu = lmforge.load(tmp_path / "run", device="cuda")
    ids = torch.tensor([tokenizer.encode("Shall I compare thee")])
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(ids.cuda()).cpu(), on_cpu(ids), atol=2e-4, rtol=1e-4)
    assert on_gpu.generate("Shall I", max_new_tokens=5, temperature=0)[0] != ""


@pytest.mark.gpu
@needs_cuda
def test_gpu_resume_of_a_cpu_checkpoint(tokenizer, tmp_path) -> None:
    tiny_trainer(tmp_path / "cpu", tokenizer, max_steps=3).fit()
    shutil.copytree(tmp_path / "cpu", tmp_path / "gpu")
    summary = tiny_trainer(tmp_path / "gpu", tokenizer, max_steps=6, device="cuda").fit(resume=True)
    assert summary["step"] == 6 and np.isfinite(summary["val_loss"])

