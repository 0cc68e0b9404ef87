"""The VAE language model at work: sample, reconstruct, interpolate, encode (training: `lmforge.recipes.vae`).

    model = lmforge.load("runs/vae")
    sample(model, 5)                                   # texts decoded from z ~ N(0, I)
    reconstruct(model, ["To be, or not to be"])        # decode(mean of q(z | x))
    interpolate(model, "text A", "text B", steps=5)    # decode along the line between the two means
    mu = encode(model, texts)                          # (N, latent_dim) numpy array of posterior means

CLI: `lmforge vae train --data shakespeare --out runs/vae`, `lmforge vae sample|reconstruct|interpolate|
encode CHECKPOINT ...`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.models.vae import VAE
from lmforge.recipes.vae import read_texts, text_pairs

__all__ = ["decode_latents", "encode", "interpolate", "read_texts", "reconstruct", "require_vae", "sample",
           "save_latents"]
from lmforge.train.objectives import collate_pairs

# ----------------------------------------------------------------------------------------------
# using a trained model


def require_vae(model: Any) -> VAE:
    if not isinstance(model, VAE):
        kind = getattr(getattr(model, "config", None), "kind", "?")
        raise UserError(f"this checkpoint holds a {kind} model; the vae verbs need a vae checkpoint "
                        f"(train one with lmforge vae train)")
    if model.tokenizer is None:
        raise UserError("this model has no tokenizer; load it with lmforge.load(CHECKPOINT)")
    return model


@torch.no_grad()
def decode_latents(model: VAE, z: torch.Tensor, max_new_tokens: int = 50, temperature: float = 0.0,
                   seed: int | None = None) -> list[str]:
    """The text decoded from each latent z (N, latent_dim): greedy at temperature 0, else sampled."""
    from lmforge.infer.generate import generate_ids

    model = require_vae(model)
    eos = model.tokenizer.eos_id
    z = z.to(next(model.parameters()).device, torch.float32)
    rows = generate_ids(model, [[eos]] * len(z), min(max_new_tokens, model.config.block_size - 1), temperature,
                        eos_id=eos, seed=seed, condition={"z": z})
    return [model.tokenizer.decode(r) for r in rows]


@torch.no_grad()
def encode(model: VAE, texts: Sequence[str], too_long: str = "truncate", batch_size: int = 64
           ) -> tuple[np.ndarray, np.ndarray]:
    """The posterior mean and log-variance (N, latent_dim) of each text."""
    model = require_vae(model)
    pairs = text_pairs(texts, model.tokenizer, model.config.block_size, too_long)
    device = next(model.parameters()).device
    mus, logvars = [], []
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], model.tokenizer.eos_id, device)
        mu, logvar = model.encode(batch["source"], batch["source_mask"])
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy()


def sample(model: VAE, num_samples: int = 5, max_new_tokens: int = 50, temperature: float = 0.0,
           seed: int | None = None) -> list[str]:
    """Texts decoded from latents drawn from the prior N(0, I)."""
    if num_samples < 1:
        raise UserError(f"--num-samples = {num_samples}; expected >= 1")
    model = require_vae(model)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None  # None: fresh draws
    z = torch.randn(num_samples, model.config.latent_dim, generator=generator, device="cpu")  # the same z on any device
    return decode_latents(model, z, max_new_tokens, temperature, seed)


def reconstruct(model: VAE, texts: Sequence[str], max_new_tokens: int = 50, temperature: float = 0.0,
                seed: int | None = None) -> list[str]:
    """Each text decoded from its posterior mean."""
    mu, _ = encode(model, texts)
    return decode_latents(model, torch.from_numpy(mu), max_new_tokens, temperature, seed)


def interpolate(model: VAE, a: str, b: str, steps: int = 5, max_new_tokens: int = 50) -> list[tuple[float, str]]:
    """(t, text) along z = (1 - t) mu(a) + t mu(b) for `steps` evenly spaced t from 0 to 1 (greedy decoding)."""
    if steps < 2:
        raise UserError(f"--steps = {steps}; expected >= 2 (the two ends at least)")
    mu, _ = encode(model, [a, b])
    ts = torch.linspace(0, 1, steps)
    ends = torch.from_numpy(mu)
    z = (1 - ts)[:, None] * ends[0] + ts[:, None] * ends[1]
    return list(zip(ts.tolist(), decode_latents(model, z, max_new_tokens)))


def save_latents(texts: Sequence[str], mu: np.ndarray, logvar: np.ndarray, out: str | Path) -> Path:
    """Write posterior means as .npy (an (N, latent_dim) float32 array), or texts with mu and logvar as .json.

    The file is written beside its name and renamed into place; an existing file is never replaced.
    """
    out = Path(out)
    if out.suffix not in (".npy", ".json"):
        raise UserError(f"--out {out}: expected a .npy or .json file name")
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, mu.astype(np.float32))
    else:
        records = [{"text": t, "mu": [round(float(x), 6) for x in m], "logvar": [round(float(x), 6) for x in v]}
                   for t, m, v in zip(texts, mu, logvar)]
        tmp.write_text(json.dumps(records, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------------------------
# the verbs: `lmforge vae sample / reconstruct / interpolate / encode CHECKPOINT ...`


def _load_vae(checkpoint: str | Path, device: str) -> VAE:
    import lmforge.sources

    return require_vae(lmforge.sources.load(checkpoint, device))


def print_samples(checkpoint: str | Path, num_samples: int = 5, max_new_tokens: int = 50, temperature: float = 0.0,
                  seed: int = 0, device: str = "auto") -> None:
    """Texts decoded from latents drawn from the prior, one per line.

    Args:
        checkpoint: a vae checkpoint or run directory
        num_samples: texts to draw
        max_new_tokens: the most tokens of a text
        temperature: 0 = greedy given z
        seed: the seed of the prior draws
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    for text in sample(_load_vae(checkpoint, device), num_samples, max_new_tokens, temperature, seed):
        print(text)


def print_reconstruction(checkpoint: str | Path, text: str, max_new_tokens: int = 50, device: str = "auto") -> None:
    """A text decoded from its posterior mean.

    Args:
        checkpoint: a vae checkpoint or run directory
        text: the text to encode and decode
        max_new_tokens: the most tokens of the decoded text
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    print(reconstruct(_load_vae(checkpoint, device), [text], max_new_tokens)[0])


def print_interpolation(checkpoint: str | Path, a: str, b: str, steps: int = 5, max_new_tokens: int = 50,
                        device: str = "auto") -> None:
    """Texts along the line between the latent codes of A and B: `t  text` per line.

    Args:
        checkpoint: a vae checkpoint or run directory
        a: the first text
        b: the second text
        steps: points along the line, ends included
        max_new_tokens: the most tokens of a decoded text
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    for t, text in interpolate(_load_vae(checkpoint, device), a, b, steps, max_new_tokens):
        print(f"{t:.2f}  {text}")


def encode_file(checkpoint: str | Path, data: str | Path, out: str | Path, unit: Literal["line", "document"] = "line",
                text_field: str = "text", device: str = "auto") -> dict[str, Any]:
    """Write the latent means of the texts of a file as .npy or .json.

    Returns the counts and the path.

    Args:
        checkpoint: a vae checkpoint or run directory
        data: the texts: a file, folder or glob of txt/jsonl/csv/parquet files, or a catalog name
        out: FILE.npy (the means, N x latent_dim) or FILE.json (text, mu and logvar per text)
        unit: one text per line, or per document
        text_field: the jsonl field / csv or parquet column of the text
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    model = _load_vae(checkpoint, device)
    texts = read_texts(data, unit, text_field)
    mu, logvar = encode(model, texts)
    return {"texts": len(texts), "dimensions": mu.shape[1], "out": save_latents(texts, mu, logvar, out)}
