"""The model kinds, all built of the Transformer layers of `layers.py`, and the one factory that builds them.

    model = build_model(ModelConfig(kind="seq2seq"))    # Decoder, Seq2Seq, VAE or ConditionalVAE, by `config.kind`
"""

from __future__ import annotations

from torch import nn

from lmforge.config import ModelConfig


def model_class(kind: str) -> type[nn.Module]:
    """The class of a model kind: decoder -> Decoder, seq2seq -> Seq2Seq, vae -> VAE, cvae -> ConditionalVAE."""
    from lmforge.models.decoder import Decoder
    from lmforge.models.seq2seq import Seq2Seq
    from lmforge.models.vae import VAE, ConditionalVAE

    classes = {"decoder": Decoder, "seq2seq": Seq2Seq, "vae": VAE, "cvae": ConditionalVAE}
    if kind not in classes:
        from lmforge.errors import UserError

        raise UserError(f"model kind {kind!r} is not supported; supported: {', '.join(classes)}")
    return classes[kind]


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model of `config.kind`."""
    return model_class(config.kind)(config)
