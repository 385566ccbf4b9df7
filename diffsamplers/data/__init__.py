"""Datasets that ship with installed packages (no downloads)."""

from .digits import DIGITS_RESOLUTION, load_digits_dataset

__all__ = ["DIGITS_RESOLUTION", "load_digits_dataset"]
