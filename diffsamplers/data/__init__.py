"""Data: datasets that ship with installed packages (no downloads), and data sources for the methods that
need real data (Align Your Steps optimisation, Gaussian statistics); Python's own documentation text for the
bundled masked diffusion language model."""

from .digits import DIGITS_RESOLUTION, load_digits_dataset
from .sources import DataSource, iter_batches, take
from .text import CharVocab, TextCorpus, load_text_corpus

__all__ = [
    "CharVocab",
    "DIGITS_RESOLUTION",
    "DataSource",
    "TextCorpus",
    "iter_batches",
    "load_digits_dataset",
    "load_text_corpus",
    "take",
]
