"""Data: datasets that ship with installed packages (no downloads), and data sources for the methods that
need real data (Align Your Steps optimisation, Gaussian statistics)."""

from .digits import DIGITS_RESOLUTION, load_digits_dataset
from .sources import DataSource, iter_batches, take

__all__ = ["DIGITS_RESOLUTION", "DataSource", "iter_batches", "load_digits_dataset", "take"]
