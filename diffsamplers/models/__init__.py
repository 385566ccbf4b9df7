"""Bundled models: exact Gaussian mixtures (and, later, small trained networks)."""

from .gmm import GaussianMixture, GMMDenoiser, GMMModel, default_mixture, default_process, reference_solution

__all__ = ["GMMDenoiser", "GMMModel", "GaussianMixture", "default_mixture", "default_process", "reference_solution"]
