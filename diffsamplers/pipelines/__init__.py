"""diffusers pipelines for the bundled models."""

from .digits_pipeline import DigitsPipeline

__all__ = ["DigitsPipeline"]
