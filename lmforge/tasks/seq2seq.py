"""Predict targets for sources with an encoder-decoder (`kind: seq2seq`) or a conditional VAE (`cvae`).

    model = lmforge.load("runs/s2s")                      # trained by lmforge.recipes.seq2seq.train_seq2seq
    outputs = predict(model, ["another article ..."], beam_size=4, max_new_tokens=64)
    predict(lmforge.load("runs/cvae"), ["an article"], z_seed=1)                          # one draw of z
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.errors import UserError
from lmforge.models.seq2seq import Seq2Seq


def predict(
    model: Seq2Seq,
    sources: Sequence[str],
    beam_size: int = 1,
    max_new_tokens: int = 64,
    length_penalty: float = 1.0,
    temperature: float = 0.0,
    seed: int | None = None,
    too_long: str = "truncate",
    batch_size: int = 32,
    z_seed: int | None = None,
) -> list[str]:
    """The model's output text for each source: greedy (default), sampled (temperature > 0) or beam search.

    A conditional VAE decodes from its prior's mean, or from a draw of z with `z_seed` (other seeds,
    other summaries).
    """
    if not isinstance(model, Seq2Seq):
        raise UserError(f"predict needs a seq2seq model; this one is a {type(model).__name__} "
                        f"(kind {getattr(model.config, 'kind', '?')})")
    return model.generate(list(sources), max_new_tokens=max_new_tokens, temperature=temperature,
                          beam_size=beam_size, length_penalty=length_penalty, seed=seed, too_long=too_long,
                          batch_size=batch_size, condition_options={"z_seed": z_seed} if z_seed is not None else None)
