"""Metrics of generated samples: Fréchet distances, feature networks, resumable sharded sampling, and the k-NN
metrics of what guidance changes (precision/recall, density/coverage, AvgkNN, within-class diversity)."""

from .features import DigitsFeatures, InceptionFeatures, ModuleFeatures, find_inception_weights
from .frechet import FeatureStats, frechet_distance, load_stats, save_stats
from .manifold import average_knn_distance, density_coverage, precision_recall, within_class_diversity
from .shards import ShardRun, sample_seed

__all__ = [
    "DigitsFeatures",
    "FeatureStats",
    "InceptionFeatures",
    "ModuleFeatures",
    "ShardRun",
    "average_knn_distance",
    "density_coverage",
    "find_inception_weights",
    "frechet_distance",
    "load_stats",
    "precision_recall",
    "sample_seed",
    "save_stats",
    "within_class_diversity",
]
