"""The VAE recipe: a Transformer VAE language model trained from scratch on short texts, on the ELBO.

    summary = train_vae_from_data("shakespeare", "runs/vae", preset="tiny", elbo=ElboConfig(free_bits=0.1))
    summary = train_vae(train_texts, val_texts, tokenizer, preset("tiny"), TrainConfig(max_steps=2000),
                        "runs/vae", ElboConfig(beta_schedule="cyclical", free_bits=0.1))

Training goes through the one Trainer with `ElboLoss`; the run directory holds `run.yaml`,
`metrics.jsonl`, `loss.png`, `vae.png` (reconstruction, KL, active units and mutual information at
each evaluation), `summary.json` and `checkpoint/`. Using a trained VAE: `lmforge.tasks.vae`.

Metrics at every evaluation (`evaluate_vae`), on the held-out texts:
- `val_loss`: the negative ELBO (beta = 1, no free bits) per token: an upper bound of the NLL;
- `val_recon`: reconstruction cross-entropy per token, z drawn from q(z | x);
- `val_kl`: KL(q(z | x) || p(z)) per text, in nats (near 0 = posterior collapse);
- `active_units`: latent dimensions whose posterior mean varies over the texts (Cov_x E[z_d] > 0.01,
  Burda et al. 2016);
- `mutual_info`: I(x; z) under q, estimated over the held-out texts (Hoffman & Johnson 2016; the
  estimator of He et al. 2019), at most log(number of texts);
- `val_nll_iw` and `val_ppl_iw`: NLL per token and perplexity upper bounds from `iw_samples`
  importance samples, log p(x) >= E log mean_s p(x, z_s) / q(z_s | x) (Burda et al. 2016).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lmforge.config import ElboConfig, ModelConfig, TrainConfig, from_dict, load_run_config, settings, to_dict
from lmforge.data.batches import hold_out
from lmforge.errors import UserError
from lmforge.models.seq2seq import encode_texts
from lmforge.models.vae import VAE
from lmforge.train.objectives import IGNORE, ElboLoss, Pair, collate_pairs, gaussian_kl, pair_batches
from lmforge.train.recipe import Job, Recipe, run_recipe, say

LOG_2PI = math.log(2 * math.pi)


def text_pairs(texts: Sequence[str], tokenizer, block_size: int, too_long: str = "truncate",
               what: str = "text") -> list[Pair]:
    """Each text as a pair whose source and target are the text (at most block_size - 1 tokens)."""
    ids = encode_texts(texts, tokenizer, block_size - 1, too_long, what)
    return [Pair(i, i) for i in ids]


def read_texts(data: str | Path, unit: str = "line", text_field: str = "text") -> list[str]:
    """Texts from a catalog name or a path (as `lmforge prepare` reads them): each non-empty line, or each
    whole document (`unit="document"`)."""
    from lmforge.data.sources import read_source

    if unit not in ("line", "document"):
        raise UserError(f"--unit = {unit!r}; expected line or document")
    docs = read_source(data, text_field)
    if unit == "document":
        texts = [d.text.strip() for d in docs]
    else:
        texts = [line.strip() for d in docs for line in d.text.splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise UserError(f"{data}: no text found")
    return texts


# ----------------------------------------------------------------------------------------------
# evaluation


def _log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def _log_p_x_given_z(model: VAE, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """log p(x | z) of each text (B,), in nats."""
    logits = model(batch["ids"], z=z).float()
    ce = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="none")
    return -ce.view(batch["targets"].shape).sum(-1)


@torch.no_grad()
def evaluate_vae(model: VAE, pairs: Sequence[Pair], batch_size: int, eos_id: int, iw_samples: int = 16,
                 seed: int = 0) -> dict[str, float]:
    """The metrics of the module docstring over `pairs` (texts as pairs); deterministic for a given seed."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    mus, logvars = [], []
    recon_total = kl_total = iw_total = 0.0
    tokens = 0
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], eos_id, device)
        mu, logvar = model.encode(batch["source"], batch["source_mask"])
        mus.append(mu)
        logvars.append(logvar)
        tokens += int((batch["targets"] != IGNORE).sum())
        kl_total += gaussian_kl(mu, logvar).sum().item()
        log_weights = []
        for s in range(iw_samples):
            z = model.reparameterize(mu, logvar, generator)
            log_px = _log_p_x_given_z(model, batch, z)
            if s == 0:
                recon_total -= log_px.sum().item()
            log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
            log_weights.append(log_px + log_pz - _log_normal(z, mu, logvar))
        log_px_bound = torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(iw_samples)
        iw_total -= log_px_bound.sum().item()
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    nll_iw = iw_total / tokens
    return {
        "val_loss": (recon_total + kl_total) / tokens,
        "val_recon": recon_total / tokens,
        "val_kl": kl_total / len(mu),
        "active_units": float(active_units(mu)),
        "mutual_info": mutual_information(mu, logvar, generator),
        "val_nll_iw": nll_iw,
        "val_ppl_iw": math.exp(min(nll_iw, 50.0)),
    }


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies over the texts by more than `threshold` (variance)."""
    if len(mu) < 2:
        return 0
    return int((mu.float().var(dim=0) > threshold).sum())


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                       samples: int = 16) -> float:
    """I(x; z) under q(z | x) and the empirical distribution of the N texts given (mu, logvar (N, D)):
    E_x E_q log q(z|x) - E_z log q(z), with q(z) the mixture of the N posteriors (He et al. 2019).

    The first term is exact; the second is averaged over `samples` draws of z per text (one draw, as in
    He et al., is too noisy for a few hundred texts). It lies in [0, log N] up to that noise.
    """
    N, D = mu.shape
    neg_entropy = (-0.5 * D * LOG_2PI - 0.5 * (1 + logvar).sum(-1)).mean()
    eps = torch.randn((samples, N, D), generator=generator, device=mu.device)
    z = mu + (0.5 * logvar).exp() * eps  # (S, N, D): draws of z_i ~ q(z | x_i)
    log_q_all = _log_normal(z[:, :, None], mu[None, None], logvar[None, None])  # (S, N, N): log q(z_i | x_j)
    log_q_z = torch.logsumexp(log_q_all, dim=2) - math.log(N)
    return (neg_entropy - log_q_z.mean()).item()


@torch.no_grad()
def evaluate_conditional_elbo(model, pairs: Sequence[Pair], batch_size: int, eos_id: int, seed: int = 0
                              ) -> dict[str, float]:
    """A conditional VAE's `val_loss` (negative ELBO per summary token, beta = 1), `val_recon` (per token,
    z from the posterior) and `val_kl` (KL(q(z | article, summary) || p(z | article)) per pair, nats)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    recon_total = kl_total = 0.0
    tokens = 0
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], eos_id, device)
        memory = model.encode(batch["source"], batch["source_mask"])
        summary_mask = batch["targets"] != IGNORE
        prior = model.prior(memory, batch["source_mask"])
        mu, logvar = model.posterior(memory, batch["source_mask"], batch["targets"].clamp(min=0), summary_mask)
        z = model.reparameterize(mu, logvar, generator)
        n = int(summary_mask.sum())
        recon_total += model(batch["ids"], targets=batch["targets"], source=batch["source"],
                             source_mask=batch["source_mask"], z=z).item() * n
        kl_total += gaussian_kl(mu, logvar, *prior).sum().item()
        tokens += n
    return {"val_loss": (recon_total + kl_total) / tokens, "val_recon": recon_total / tokens,
            "val_kl": kl_total / len(pairs)}


@torch.no_grad()
def kl_per_dimension(model: VAE, pairs: Sequence[Pair], batch_size: int, eos_id: int) -> list[float]:
    """Mean KL(q(z_d | x) || N(0, 1)) of each latent dimension over `pairs`, in nats."""
    device = next(model.parameters()).device
    total = torch.zeros(model.config.latent_dim, device=device)
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], eos_id, device)
        total += gaussian_kl(*model.encode(batch["source"], batch["source_mask"])).sum(0)
    return (total / len(pairs)).tolist()


# ----------------------------------------------------------------------------------------------
# the recipe


class TrainVAE(Recipe):
    name = "vae"

    def __init__(self, train_texts: Sequence[str], val_texts: Sequence[str], tokenizer, model_config: ModelConfig,
                 train_config: TrainConfig, elbo: ElboConfig | None = None, too_long: str = "truncate",
                 info: dict[str, Any] | None = None):
        super().__init__()
        self.texts, self.val_texts, self.tokenizer = list(train_texts), list(val_texts), tokenizer
        self.model_config = dataclasses.replace(model_config, kind="vae", vocab_size=tokenizer.vocab_size).validate()
        self.train = train_config.validate()
        self.elbo, self.too_long, self.info = (elbo or ElboConfig()).validate(), too_long, dict(info or {})

    def settings(self) -> dict[str, Any]:
        return {**self.info, "elbo": to_dict(self.elbo), "too_long": self.too_long}

    def build(self) -> Job:
        config, train_config, elbo, tokenizer = self.model_config, self.train, self.elbo, self.tokenizer
        train = text_pairs(self.texts, tokenizer, config.block_size, self.too_long, "training text")
        val = text_pairs(self.val_texts, tokenizer, config.block_size, self.too_long, "validation text")
        torch.manual_seed(train_config.seed)
        model = VAE(config)
        self.n_params = model.num_parameters()
        eos, batch_size = tokenizer.eos_id, train_config.batch_size
        self.val, self.eos = val, eos

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            return evaluate_vae(m, val, batch_size, eos, elbo.iw_samples, seed=train_config.seed)

        batches = pair_batches(train, batch_size, train_config.seed, eos)
        say(f"training a VAE ({model.num_parameters():,} parameters, z of {config.latent_dim} dimensions) "
            f"on {len(train)} texts, {len(val)} held out; beta {elbo.beta_schedule} to {elbo.beta}, "
            f"free bits {elbo.free_bits}")
        return Job(model, batches, loss_fn=ElboLoss(elbo, train_config.max_steps), evaluate=evaluate,
                   tokenizer=tokenizer,
                   info={"task": "vae", "elbo": to_dict(elbo), "train_texts": len(train), "val_texts": len(val),
                         "parameters": model.num_parameters(), **self.info},
                   tokens_per_row=sum(2 * len(p.target) + 1 for p in train) / len(train),
                   steps_per_epoch=batches.steps_per_epoch)

    def report(self, trainer, summary: dict[str, Any]) -> dict[str, Any]:
        out = Path(summary["out"])
        kl = kl_per_dimension(trainer.model, self.val, self.train.batch_size, self.eos)
        if trainer.dist.main:
            plot_vae_metrics(out / "metrics.jsonl", out / "vae.png", title=self.title(None, out))
        return {**summary, "kl_per_dim": [round(k, 4) for k in kl], "checkpoint": str(out / "checkpoint"),
                "loss_png": str(out / "loss.png"), "vae_png": str(out / "vae.png")}

    def title(self, job: Job | None, out: Path) -> str:
        return f"{out.name}: VAE, {self.n_params:,} params"


def train_vae(
    train_texts: Sequence[str],
    val_texts: Sequence[str],
    tokenizer,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out: str | Path,
    elbo: ElboConfig | None = None,
    too_long: str = "truncate",
    info: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a VAE from scratch on `train_texts` into the run directory `out`; return the summary.

    The summary holds the last evaluation's metrics (module docstring), `kl_per_dim`, the paths
    `out`, `checkpoint`, `loss_png` and `vae_png`.
    """
    recipe = TrainVAE(train_texts, val_texts, tokenizer, model_config, train_config, elbo, too_long, info)
    return run_recipe(recipe, out, resume)


@settings(model=ModelConfig, train=TrainConfig)
def train_vae_from_data(
    data: str | Path,
    out: str | Path,
    preset: str | None = "tiny",
    overrides: dict[str, Any] | None = None,
    elbo: ElboConfig | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    unit: Literal["line", "document"] = "line",
    val_fraction: float = 0.05,
    max_val_texts: int = 500,
    text_field: str = "text",
    too_long: Literal["truncate", "error"] = "truncate",
    resume: bool = False,
) -> dict[str, Any]:
    """Train a VAE language model on short texts (each line of --data, by default).

    The encoder gives mu and sigma of a latent z, the decoder writes text from z; trained on the ELBO with
    beta annealing and free bits, every evaluation logs reconstruction, KL, active units, mutual
    information and an importance-sampled perplexity bound (and OUT/vae.png). Model and training settings
    merge as for pretraining: --preset, --config (`preset:`, `model:`, `train:`), --model.FIELD /
    --train.FIELD. Returns the summary of the last evaluation.

    Args:
        data: the texts: a file, folder or glob of txt/jsonl/csv/parquet files, or a catalog name (shakespeare)
        out: the run directory to create (metrics.jsonl, loss.png, vae.png, checkpoint/)
        preset: the model's sizes (see lmforge models)
        overrides: model.FIELD and train.FIELD settings
        elbo: the ELBO objective (--elbo.FIELD, or --FIELD-NAME)
        tokenizer: a tokenizer.json or a directory holding one (default: train one on the training texts;
            a resumed run keeps the one in its checkpoint)
        vocab_size: the size of the tokenizer trained
        unit: one text per line, or per document
        val_fraction: the share of texts held out
        max_val_texts: the most texts held out
        text_field: the jsonl field / csv or parquet column
        too_long: texts longer than the context: cut with a warning, or stop with an error
        resume: continue the run in --out after a stop or a kill (the same command; train.* may change)
    """
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    out = Path(out)
    base = None
    if resume:
        from lmforge.train.recipe import read_run

        stored = read_run(out)
        base = (from_dict(ModelConfig, stored.get("model") or {}, "run.yaml: model"),
                from_dict(TrainConfig, stored.get("train") or {}, "run.yaml: train"))
    model_config, train_config = load_run_config(preset if base is None else None, None, overrides, base)
    texts = read_texts(data, unit, text_field)
    train_texts, val_texts = hold_out(texts, val_fraction, seed=0, what="text")
    val_texts = val_texts[:max_val_texts]
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
    elif resume and (out / "checkpoint" / "tokenizer.json").is_file():
        tok = Tokenizer.load(out / "checkpoint")
    else:
        tok = train_tokenizer(train_texts, vocab_size=vocab_size)
    return train_vae(train_texts, val_texts, tok, model_config, train_config, out, elbo, too_long,
                     info={"data": str(data), "unit": unit}, resume=resume)


def trained(s: dict[str, Any], arguments: dict[str, Any]) -> str:
    """What `lmforge vae train` prints when it is done."""
    return (f"step {s['step']}: -ELBO {s['val_loss']:.4f} nats/token (reconstruction {s['val_recon']:.4f}), "
            f"KL {s['val_kl']:.3f} nats/text, active units {s['active_units']:g}, I(x;z) {s['mutual_info']:.3f}, "
            f"perplexity <= {s['val_ppl_iw']:.2f}; checkpoint in {s['checkpoint']}, plots in {s['vae_png']}")


def plot_vae_metrics(metrics_file: str | Path, png: str | Path, title: str = "") -> Path:
    """Reconstruction and KL, active units, and mutual information at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    evals = [r for r in records if "val_kl" in r]
    steps = [r["step"] for r in evals]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    axes[0].plot(steps, [r["val_recon"] for r in evals], "o-", label="reconstruction (nats/token)")
    axes[0].plot(steps, [r["val_nll_iw"] for r in evals], "s-", label="NLL bound, importance sampled (nats/token)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    kl_axis = axes[0].twinx()
    kl_axis.plot(steps, [r["val_kl"] for r in evals], "^-", color="tab:red", label="KL (nats/text)")
    kl_axis.legend(fontsize=8, loc="center right")
    axes[1].plot(steps, [r["active_units"] for r in evals], "o-", color="tab:green")
    axes[1].set_title("active units")
    axes[2].plot(steps, [r["mutual_info"] for r in evals], "o-", color="tab:purple")
    axes[2].set_title("mutual information I(x; z) (nats)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or Path(metrics_file).parent.name)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
