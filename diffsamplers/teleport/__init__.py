"""Gaussian (analytical) teleportation: a closed-form start for any solver (Wang & Vastola 2024)."""

from .gaussian import (
    GaussianDenoiser,
    GaussianTeleport,
    SkipChoice,
    TeleportLevel,
    choose_skip,
    gaussian_flow,
    gaussian_posterior_mean,
    teleport_level,
    teleport_schedule,
)
from .statistics import GaussianStatistics, class_statistics, load_class_statistics, save_class_statistics

__all__ = [
    "GaussianDenoiser",
    "GaussianStatistics",
    "GaussianTeleport",
    "SkipChoice",
    "TeleportLevel",
    "choose_skip",
    "class_statistics",
    "gaussian_flow",
    "gaussian_posterior_mean",
    "load_class_statistics",
    "save_class_statistics",
    "teleport_level",
    "teleport_schedule",
]
