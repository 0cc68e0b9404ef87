"""lmforge: the whole life of a generative language model, readable and fast."""

__version__ = "0.1.0"
