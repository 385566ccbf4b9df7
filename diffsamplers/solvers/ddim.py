"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Eq. 12 and 16).

With ε̂ = (x_s − α_s x̂0)/σ_s the update is x_t = α_t x̂0 + √(σ_t² − c²) ε̂ + c z, where the injected noise
c = η σ_t √(1 − e^{−2h}) equals Eq. 16's η √((1 − ᾱ_t)/(1 − ᾱ_s)) √(1 − ᾱ_s/ᾱ_t) for VP models and
generalises it to any (α, σ). η = 0 is the deterministic DDIM, identical to first-order DPM-Solver++;
η = 1 is ancestral sampling (DDPM's posterior).
"""

from __future__ import annotations

import numpy as np

from ..noise import NoiseProcess
from .base import LinearStep, Solver, marginals

__all__ = ["DDIM"]


class DDIM(Solver):
    """DDIM with stochasticity η ∈ [0, 1]."""

    def __init__(self, eta: float = 0.0):
        super().__init__()
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)
        self.name = "ddim" if eta == 0 else f"ddim(eta={eta:g})"

    def _coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        lam, alpha, sigma = marginals(process, sigmas)
        steps = []
        for k in range(sigmas.size - 1):
            h = lam[k + 1] - lam[k]
            keep = np.sqrt(1.0 - self.eta**2 * -np.expm1(-2.0 * h))  # √(σ_t² − c²)/σ_t
            c_x = sigma[k + 1] * keep / sigma[k]
            c_z = self.eta * sigma[k + 1] * np.sqrt(-np.expm1(-2.0 * h))
            steps.append(LinearStep(x=float(c_x), history=(float(alpha[k + 1] - c_x * alpha[k]),), noise=float(c_z)))
        return np.asarray(sigmas[:-1], dtype=np.float64), steps, 1
