"""FD-digits: the Fréchet distance of digit samples to the bundled model's 1,438 training digits, in the 64-d
features of the bundled digits classifier (a Fréchet distance like FID on a domain Inception never saw — not FID,
not comparable with FID)."""

from __future__ import annotations

import functools

import torch

from ..data.digits import load_digits_dataset, to_uint8
from ..models.digits import load_digits_classifier
from .features import DigitsFeatures
from .frechet import FeatureStats, frechet_distance

__all__ = ["fd_digits", "digits_features"]


@functools.lru_cache(maxsize=1)
def digits_features() -> DigitsFeatures:
    """The bundled classifier's feature network (loaded once)."""
    return DigitsFeatures(load_digits_classifier())


@functools.lru_cache(maxsize=1)
def _training_statistics() -> FeatureStats:
    extractor = digits_features()
    images, _ = load_digits_dataset("train")
    return FeatureStats(extractor.dim).update(extractor(to_uint8(images)))


def fd_digits(samples: torch.Tensor) -> float:
    """FD-digits of ``samples`` (values in [−1, 1], shape (N, 1, 16, 16)) against the training digits."""
    extractor, ref = digits_features(), _training_statistics()
    stats = FeatureStats(extractor.dim).update(extractor(to_uint8(samples.detach().float().cpu())))
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
