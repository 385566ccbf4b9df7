"""Metrics of generated samples: Fréchet distances, feature networks, resumable sharded sampling."""

from .features import DigitsFeatures, InceptionFeatures, ModuleFeatures, find_inception_weights
from .frechet import FeatureStats, frechet_distance, load_stats, save_stats
from .shards import ShardRun, sample_seed

__all__ = [
    "DigitsFeatures",
    "FeatureStats",
    "InceptionFeatures",
    "ModuleFeatures",
    "ShardRun",
    "find_inception_weights",
    "frechet_distance",
    "load_stats",
    "sample_seed",
    "save_stats",
]
