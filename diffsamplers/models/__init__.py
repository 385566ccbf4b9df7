"""Bundled models: exact Gaussian mixtures, an exact Markov chain for masked diffusion, and small trained networks."""

from .gmm import GaussianMixture, GMMDenoiser, GMMModel, default_mixture, default_process, reference_solution
from .markov_chain import MarkovChainModel, default_markov_chain

__all__ = [
    "GMMDenoiser",
    "GMMModel",
    "GaussianMixture",
    "MarkovChainModel",
    "default_markov_chain",
    "default_mixture",
    "default_process",
    "reference_solution",
]
