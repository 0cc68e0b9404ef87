"""Tests of the VAE language model: the KL against the closed form of known Gaussians, the beta schedules,
free bits, the ELBO objective, the posterior-collapse metrics, the model's masks and cache, a tiny training
whose loss goes down, the checkpoint round trip, the `lmforge vae` verbs, and bad settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SONNET

import lmforge
from lmforge.cli import main
from lmforge.config import ElboConfig, ModelConfig, TrainConfig
from lmforge.errors import UserError
from lmforge.models import build_model
from lmforge.models.vae import VAE, ConditionalVAE
from lmforge.recipes import vae as vae_recipe
from lmforge.recipes.seq2seq import train_seq2seq
from lmforge.tasks import vae as vae_task
from lmforge.tasks.seq2seq import predict
from lmforge.train.checkpoint import save_checkpoint
from lmforge.train.objectives import ConditionalElboLoss, ElboLoss, Pair, free_bits_kl, gaussian_kl, pair_batches


def vae_config(**overrides) -> ModelConfig:
    values = dict(kind="vae", vocab_size=61, block_size=24, n_layer=2, n_encoder_layer=1, n_head=2, d_model=32,
                  latent_dim=6)
    return ModelConfig(**{**values, **overrides}).validate()


def make_vae(seed: int = 0, **overrides) -> VAE:
    torch.manual_seed(seed)
    model = build_model(vae_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


# ----------------------------------------------------------------------------------------------
# the objective


def test_kl_of_known_gaussians_equals_the_closed_form() -> None:
    mu = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 3.0]])
    logvar = torch.tensor([[0.0, 0.0, math.log(4.0)], [math.log(0.25), -1.0, 0.5]])
    kl = gaussian_kl(mu, logvar)
    assert kl.shape == (2, 3)
    # by hand: N(0,1) -> 0; N(1,1) -> 1/2; N(-2, 4) -> (4 + 4 - 1 - log 4) / 2
    torch.testing.assert_close(kl[0], torch.tensor([0.0, 0.5, (4 + 4 - 1 - math.log(4)) / 2]))
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                                  torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl, reference)


def test_beta_schedules() -> None:
    linear = ElboConfig(beta=0.8, beta_schedule="linear", beta_warmup_steps=100)
    assert [linear.beta_at(s, 1000) for s in (0, 50, 100, 900)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    assert ElboConfig(beta_schedule="linear").beta_at(250, 1000) == pytest.approx(0.5)  # warmup: half the run
    cyclical = ElboConfig(beta=1.0, beta_schedule="cyclical", beta_cycles=4, beta_cycle_ratio=0.5)
    # cycles of 25 steps: rising over 12.5 steps, then held; back to 0 at each new cycle
    got = [cyclical.beta_at(s, 100) for s in (0, 5, 10, 13, 24, 25, 30, 99)]
    assert got == pytest.approx([0.0, 0.4, 0.8, 1.0, 1.0, 0.0, 0.4, 1.0])
    assert ElboConfig(beta=0.3, beta_schedule="constant").beta_at(0, 100) == 0.3


def test_free_bits_floor_per_dimension() -> None:
    mu = torch.tensor([[0.1, 2.0], [-0.1, 2.0]], requires_grad=True)
    logvar = torch.zeros(2, 2, requires_grad=True)
    kl = gaussian_kl(mu, logvar)  # dimension 0: 0.005 nats, dimension 1: 2 nats
    term = free_bits_kl(kl, free_bits=0.5)
    assert term.item() == pytest.approx(0.5 + 2.0)
    term.backward()
    assert mu.grad[:, 0].abs().max() == 0  # under the floor: no push towards the prior
    assert mu.grad[:, 1].abs().min() > 0
    assert free_bits_kl(kl, 0.0).item() == pytest.approx(kl.sum(-1).mean().item())


def test_elbo_loss_is_reconstruction_plus_beta_kl_per_token() -> None:
    model = make_vae().train()
    pairs = [Pair(ids, ids) for ids in ([5, 6, 7, 8], [9, 10], [11, 12, 13])]
    batch = pair_batches(pairs, 3, seed=0, eos_id=0)(step=30, part=0, rows=3)
    config = ElboConfig(beta=0.5, beta_schedule="linear", beta_warmup_steps=60)
    torch.manual_seed(1)
    loss = ElboLoss(config, max_steps=100)(model, batch)
    torch.manual_seed(1)  # the same z
    mu, logvar = model.encode(batch["source"], batch["source_mask"])
    z = model.reparameterize(mu, logvar)
    recon = model(batch["ids"], targets=batch["targets"], z=z)
    tokens = (batch["targets"] != -100).sum()
    assert tokens == 4 + 2 + 3 + 3  # each text and its end
    expected = recon + 0.25 * gaussian_kl(mu, logvar).sum() / tokens  # beta is halfway up at step 30
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.to_latent.weight.grad.abs().sum() > 0 and model.from_latent.weight.grad.abs().sum() > 0


def test_word_dropout_hides_decoder_inputs_but_not_the_start() -> None:
    model = make_vae().train()
    pairs = [Pair(ids, ids) for ids in ([5, 6, 7, 8, 9, 10], [11, 12, 13, 14])]
    batch = pair_batches(pairs, 2, seed=0, eos_id=0)(step=0, part=0, rows=2)
    config = ElboConfig(beta_schedule="constant", beta=0.0, word_dropout=0.5)
    torch.manual_seed(3)
    loss = ElboLoss(config, max_steps=10)(model, batch)
    torch.manual_seed(3)  # the same dropped words and the same z
    drop = torch.rand(batch["ids"].shape) < 0.5
    mu, logvar = model.encode(batch["source"], batch["source_mask"])
    z = model.reparameterize(mu, logvar)
    assert drop[:, 1:].any() and not drop[:, 1:].all()
    ids = batch["ids"].clone()
    ids[:, 1:][drop[:, 1:]] = 0  # the start token (end-of-text, id 0 here) in place of the dropped words
    assert ids[:, 0].tolist() == [0, 0]
    torch.testing.assert_close(loss, model(ids, targets=batch["targets"], z=z))
    assert (loss - model(batch["ids"], targets=batch["targets"], z=z)).abs() > 1e-4


@pytest.mark.parametrize("settings, message", [
    ({"beta": -0.1}, "beta = -0.1; expected a finite number >= 0"),
    ({"beta": math.inf}, "beta = inf"),
    ({"beta": math.nan}, "beta = nan"),
    ({"beta_schedule": "exponential"}, "beta_schedule = 'exponential'; expected one of constant, linear, cyclical"),
    ({"beta_warmup_steps": -5}, "beta_warmup_steps = -5"),
    ({"beta_cycles": 0}, "beta_cycles = 0"),
    ({"beta_cycle_ratio": 0.0}, "beta_cycle_ratio = 0.0; expected a value in \\(0, 1\\]"),
    ({"beta_cycle_ratio": 1.5}, "beta_cycle_ratio = 1.5"),
    ({"free_bits": -1.0}, "free_bits = -1.0"),
    ({"iw_samples": 0}, "iw_samples = 0"),
    ({"word_dropout": 1.0}, "word_dropout = 1.0; expected a value in \\[0, 1\\)"),
])
def test_bad_beta_settings_are_rejected(settings, message) -> None:
    with pytest.raises(UserError, match=message):
        ElboConfig(**settings).validate()


# ----------------------------------------------------------------------------------------------
# metrics


def test_active_units_and_mutual_information() -> None:
    g = torch.Generator().manual_seed(0)
    collapsed_mu, collapsed_logvar = torch.zeros(100, 4), torch.zeros(100, 4)
    assert vae_recipe.active_units(collapsed_mu) == 0
    assert abs(vae_recipe.mutual_information(collapsed_mu, collapsed_logvar, g)) < 0.05
    mu = torch.zeros(100, 4)
    mu[:, 1] = 100 * torch.randn(100, generator=g)  # only dimension 1 carries information
    assert vae_recipe.active_units(mu) == 1
    informative = vae_recipe.mutual_information(mu, torch.full((100, 4), -6.0), g)
    assert math.log(100) - 0.3 < informative <= math.log(100) + 0.05  # posteriors far apart: I = log N


# ----------------------------------------------------------------------------------------------
# the model


def test_encoder_ignores_padding_decoder_is_causal_and_z_matters() -> None:
    model = make_vae()
    ids = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mu, logvar = model.encode(ids, mask)
    assert mu.shape == logvar.shape == (2, 6)
    repadded = ids.clone()
    repadded[0, 6:] = 3
    torch.testing.assert_close(model.encode(repadded, mask)[0], mu)
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 61
    assert (model.encode(changed, mask)[0][0] - mu[0]).abs().amax() > 1e-4
    logits = model(ids, z=mu)
    later = ids.clone()
    later[:, 5] = (later[:, 5] + 1) % 61
    torch.testing.assert_close(model(later, z=mu)[:, :5], logits[:, :5], atol=1e-5, rtol=0)
    assert (model(ids, z=mu + 1.0) - logits).abs().amax() > 1e-3


def test_cache_with_z_equals_recompute() -> None:
    model = make_vae(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=2)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, z=z)
        cache = model.new_cache(2)
        cache.condition = {"z": z}
        parts = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 11)]
    # one token at a time sums in another order than the whole sequence: equal up to rounding, which grows with
    # the logits (here <= 20 ulps of the largest; 256 allowed; a caching mistake moves them by a good part of it)
    ulps = 256 * torch.finfo(full.dtype).eps * full.abs().max().item()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=ulps)


# ----------------------------------------------------------------------------------------------
# training, checkpoints, the verbs

LINES = [line for line in SONNET.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("vae") / "run"
    config = vae_config(vocab_size=384, block_size=24, d_model=48, latent_dim=8)
    train_config = TrainConfig(batch_size=14, max_steps=90, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=30,
                               log_interval=10, precision="fp32")
    elbo = ElboConfig(beta_schedule="cyclical", beta_cycles=2, free_bits=0.05, iw_samples=4)
    summary = vae_recipe.train_vae(LINES, LINES[:5], tokenizer, config, train_config, out, elbo)
    return out, summary


def test_training_lowers_the_loss_and_logs_the_metrics(trained) -> None:
    out, summary = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_kl" in r]
    assert len(evals) == 3
    for key in ("val_loss", "val_recon", "val_kl", "active_units", "mutual_info", "val_nll_iw", "val_ppl_iw"):
        assert all(math.isfinite(r[key]) for r in evals), key
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    last = evals[-1]
    assert last["val_loss"] == pytest.approx(last["val_recon"] + last["val_kl"] * 5 / 48, rel=0.2)  # 5 texts
    assert last["val_nll_iw"] <= last["val_loss"] + 0.05  # the importance-sampled bound is the tighter one
    assert len(summary["kl_per_dim"]) == 8 and summary["val_kl"] == last["val_kl"]
    for name in ("loss.png", "vae.png", "summary.json", "run.yaml", "checkpoint/model.safetensors"):
        assert (out / name).is_file(), name


def test_load_round_trip_and_uses(trained, tmp_path) -> None:
    out, _ = trained
    model = lmforge.load(out)
    assert isinstance(model, VAE) and model.config.kind == "vae" and model.tokenizer is not None
    mu, logvar = vae_task.encode(model, LINES[:4])
    assert mu.shape == logvar.shape == (4, 8) and mu.dtype == np.float32
    save_checkpoint(tmp_path / "copy", model)
    again = lmforge.load(tmp_path / "copy")
    np.testing.assert_array_equal(vae_task.encode(again, LINES[:4])[0], mu)
    texts = vae_task.reconstruct(model, LINES[:2], max_new_tokens=20)
    assert texts == vae_task.reconstruct(again, LINES[:2], max_new_tokens=20)
    samples = vae_task.sample(model, 3, max_new_tokens=20, seed=1)
    assert len(samples) == 3 and samples == vae_task.sample(again, 3, max_new_tokens=20, seed=1)
    path = vae_task.interpolate(model, LINES[0], LINES[3], steps=4, max_new_tokens=20)
    assert [t for t, _ in path] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert path[0][1] == vae_task.decode_latents(model, torch.from_numpy(mu[:1]), 20)[0]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`lmforge ARGS` in this process (the CLI's own `main`): exit code, stdout, stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_vae_verbs(trained, tmp_path, capsys, monkeypatch) -> None:
    out, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lines.txt").write_text("\n".join(LINES) + "\n")
    code, _, err = run_cli(capsys, "vae", "encode", str(out), "--data", "lines.txt", "--out", "z.json")
    assert code == 0, err
    records = json.loads((tmp_path / "z.json").read_text())
    assert len(records) == len(LINES) and len(records[0]["mu"]) == 8 and records[0]["text"] == LINES[0]
    code, _, err = run_cli(capsys, "vae", "encode", str(out), "--data", "lines.txt", "--out", "z.npy")
    assert code == 0 and np.load(tmp_path / "z.npy").shape == (len(LINES), 8)
    code, _, err = run_cli(capsys, "vae", "encode", str(out), "--data", "lines.txt", "--out", "z.json")
    assert code == 2 and "already exists" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "vae", "train", "--data", "lines.txt", "--out", "run", "--beta", "-1")
    assert code == 2 and "beta = -1.0; expected a finite number >= 0" in err
    assert not (tmp_path / "run").exists()
    code, text, _ = run_cli(capsys, "vae", "reconstruct", str(out), LINES[0], "--max-new-tokens", "10")
    assert code == 0 and len(text.splitlines()) == 1
    code, text, _ = run_cli(capsys, "vae", "interpolate", str(out), LINES[0], LINES[1], "--steps", "3")
    assert code == 0 and [line.split()[0] for line in text.splitlines()] == ["0.00", "0.50", "1.00"]
    code, text, err = run_cli(capsys, "generate", str(out), "--prompt", "", "--num-samples", "2",
                              "--max-new-tokens", "8", "--seed", "1")  # the generic verb: z from the prior
    assert code == 0, err
    samples = lmforge.load(out).generate(num_samples=2, max_new_tokens=8, seed=1, temperature=0.8)
    assert text == "".join(f"--- sample {i + 1} ---\n{s}\n" for i, s in enumerate(samples))


def test_vae_train_verb_and_sample(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lines.txt").write_text("\n".join(LINES * 3) + "\n")
    code, text, err = run_cli(
        capsys, "vae", "train", "--data", "lines.txt", "--out", "run", "--vocab-size", "300", "--val-fraction", "0.1",
        "--beta-schedule", "cyclical", "--free-bits", "0.1", "--iw-samples", "2", "--model.block_size", "24",
        "--model.latent_dim", "4", "--train.max_steps", "4", "--train.batch_size", "4", "--train.eval_interval", "4",
        "--train.precision", "fp32")
    assert code == 0, err
    assert "active units" in text and (tmp_path / "run/vae.png").is_file()
    info = json.loads((tmp_path / "run/checkpoint/lmforge.json").read_text())
    assert info["elbo"]["beta_schedule"] == "cyclical" and info["elbo"]["free_bits"] == 0.1
    code, text, err = run_cli(capsys, "vae", "sample", "run", "--num-samples", "2", "--max-new-tokens", "5")
    assert code == 0, err
    assert len(text.splitlines()) == 2


def test_vae_verbs_refuse_other_kinds(tmp_path, make_model, tokenizer) -> None:
    decoder = make_model()
    decoder.tokenizer = tokenizer
    save_checkpoint(tmp_path / "decoder", decoder)
    with pytest.raises(UserError, match="holds a decoder model; the vae verbs need a vae checkpoint"):
        vae_task.require_vae(lmforge.load(tmp_path / "decoder"))
    with pytest.raises(UserError, match="steps = 1; expected >= 2"):
        vae_task.interpolate(make_vae(), "a", "b", steps=1)


# ----------------------------------------------------------------------------------------------
# the conditional VAE (kind: cvae): prior p(z | article), posterior q(z | article, summary)


def test_kl_between_two_gaussians_equals_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar, prior_mu, prior_logvar = (torch.randn(3, 5, generator=g) for _ in range(4))
    kl = gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    normal = torch.distributions.Normal
    reference = torch.distributions.kl_divergence(normal(mu, (0.5 * logvar).exp()),
                                                  normal(prior_mu, (0.5 * prior_logvar).exp()))
    torch.testing.assert_close(kl, reference)
    torch.testing.assert_close(gaussian_kl(mu, logvar, torch.zeros(3, 5), torch.zeros(3, 5)), gaussian_kl(mu, logvar))


def make_cvae(seed: int = 0) -> ConditionalVAE:
    torch.manual_seed(seed)
    model = build_model(vae_config(kind="cvae")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


def test_cvae_prior_posterior_and_cache() -> None:
    model = make_cvae()
    g = torch.Generator().manual_seed(0)
    article, summary = torch.randint(1, 61, (2, 9), generator=g), torch.randint(1, 61, (2, 5), generator=g)
    article_mask, summary_mask = torch.ones(2, 9, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    article_mask[1, 6:] = False
    memory = model.encode(article, article_mask)
    prior = model.prior(memory, article_mask)
    posterior = model.posterior(memory, article_mask, summary, summary_mask)
    assert prior[0].shape == posterior[1].shape == (2, 6)
    other_summary = summary.clone()
    other_summary[:, 0] = (other_summary[:, 0] + 1) % 61
    assert (model.posterior(memory, article_mask, other_summary, summary_mask)[0] - posterior[0]).abs().amax() > 1e-4
    repadded = article.clone()
    repadded[1, 6:] = 2
    torch.testing.assert_close(model.prior(model.encode(repadded, article_mask), article_mask)[0], prior[0])
    ids = torch.randint(0, 61, (2, 7), generator=g)
    z = posterior[0]
    with torch.no_grad():
        full = model(ids, source=article, source_mask=article_mask, z=z)
        cache = model.new_cache(2)
        cache.condition = {**model.condition(article, article_mask), "z": z}
        parts = [model(ids[:, :3], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(3, 7)]
    # one token at a time sums in another order than the whole sequence: equal up to rounding, which grows with
    # the logits (here <= 20 ulps of the largest; 256 allowed; a caching mistake moves them by a good part of it)
    ulps = 256 * torch.finfo(full.dtype).eps * full.abs().max().item()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=ulps)
    assert (model(ids, source=article, source_mask=article_mask, z=z + 1) - full).abs().amax() > 1e-3


def test_cvae_trains_saves_loads_and_gives_diverse_outputs(tmp_path, tokenizer) -> None:
    from test_seq2seq import reverse_pairs

    out = tmp_path / "cvae"
    config = vae_config(kind="cvae", vocab_size=384, block_size=32, d_model=48, latent_dim=4)
    train_config = TrainConfig(batch_size=16, max_steps=40, lr=3e-3, min_lr=3e-4, warmup_steps=4, eval_interval=20,
                               log_interval=10, precision="fp32")
    elbo = ElboConfig(beta_schedule="linear", free_bits=0.1)
    summary = train_seq2seq(reverse_pairs(120, 0), reverse_pairs(16, 1), tokenizer, config, out, train_config,
                            elbo=elbo)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_kl" in r]
    assert len(evals) == 2 and evals[-1]["val_loss"] < evals[0]["val_loss"] and summary["val_kl"] >= 0
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    model = lmforge.load(out)
    assert isinstance(model, ConditionalVAE)
    assert json.loads((out / "checkpoint/config.json").read_text())["kind"] == "cvae"
    sources = ["red blue green", "gold pink"]
    mean_outputs = predict(model, sources, max_new_tokens=10)
    assert mean_outputs == predict(model, sources, max_new_tokens=10)  # the prior's mean: deterministic
    draws = [predict(model, sources, max_new_tokens=10, z_seed=s) for s in range(4)]
    assert draws[0] == predict(model, sources, max_new_tokens=10, z_seed=0)
    assert all(len(d) == 2 for d in draws)


def test_elbo_losses_run_through_distributed_data_parallel(tmp_path) -> None:
    """Under torchrun the Trainer hands the objective a DDP wrapper: the whole ELBO pass must be its forward."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        pairs = [Pair(ids, ids) for ids in ([5, 6, 7, 8], [9, 10], [11, 12, 13])]
        batch = pair_batches(pairs, 3, seed=0, eos_id=0)(step=5, part=0, rows=3)
        for model, loss_fn in ((make_vae().train(), ElboLoss(ElboConfig(word_dropout=0.2), 10)),
                               (make_cvae().train(), ConditionalElboLoss(ElboConfig(free_bits=0.1), 10))):
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            loss = loss_fn(wrapped, batch)
            loss.backward()
            assert torch.isfinite(loss) and model.from_latent.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_api_generate_and_fresh_or_seeded_z(tokenizer) -> None:
    model = make_vae(vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    assert lmforge.generate(model, "", num_samples=3, max_new_tokens=8, seed=2) == \
        model.generate(num_samples=3, max_new_tokens=8, seed=2)
    for draw in (lambda seed: model.generate(num_samples=4, max_new_tokens=8, seed=seed),
                 lambda seed: vae_task.sample(model, 4, max_new_tokens=8, seed=seed)):
        assert draw(1) == draw(1)
        assert draw(None) != draw(None)  # fresh z each call (equal only with negligible probability)
    cvae = build_model(vae_config(kind="cvae", vocab_size=tokenizer.vocab_size)).eval()
    cvae.tokenizer = tokenizer
    assert lmforge.generate(cvae, ["red blue"], max_new_tokens=6) == predict(cvae, ["red blue"], max_new_tokens=6)
    pieces: list[str] = []
    streamed = model.generate("", max_new_tokens=8, seed=0, stream=pieces.append)[0]
    assert "".join(pieces) == streamed  # streamed as it is generated, as the decoder's generate does


def test_every_kind_generates_through_the_one_loop_in_batches(tokenizer) -> None:
    """VAE and conditional VAE texts go through lmforge.infer.generate like the decoder's: the same texts,
    in the same prompt-major order, whatever the batch size (z is drawn once for all texts)."""
    from lmforge.infer.generate import generate

    model = make_vae(vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    whole = model.generate(["", "red"], num_samples=2, max_new_tokens=6, seed=5)
    assert len(whole) == 4
    assert generate(model, ["", "red"], num_samples=2, max_new_tokens=6, seed=5, temperature=0.0,
                    batch_size=1) == whole
    cvae = build_model(vae_config(kind="cvae", vocab_size=tokenizer.vocab_size)).eval()
    cvae.tokenizer = tokenizer
    sources = ["red blue", "gold", "blue red gold"]
    assert generate(cvae, sources, max_new_tokens=6, temperature=0.0, batch_size=2, too_long="error") == \
        cvae.generate(sources, max_new_tokens=6, batch_size=2, too_long="error")
