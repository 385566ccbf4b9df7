"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Eq. 12 and 16).

With ε̂ = (x_s − α_s x̂0)/σ_s the update is x_t = α_t x̂0 + √(σ_t² − c²) ε̂ + c z, where the injected noise
c = η σ_t √(1 − e^{−2h}) equals Eq. 16's η √((1 − ᾱ_t)/(1 − ᾱ_s)) √(1 − ᾱ_s/ᾱ_t) for VP models and
generalises it to any (α, σ). η = 0 is the deterministic DDIM, identical to first-order DPM-Solver++;
η = 1 is ancestral sampling (DDPM's posterior).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..noise import NoiseProcess
from .base import LinearStep, LocalCoefficients, Solver, marginals

__all__ = ["DDIM"]


class DDIM(Solver):
    """DDIM with stochasticity η ∈ [0, 1]."""

    def __init__(self, eta: float = 0.0):
        super().__init__()
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)
        self.name = "ddim" if eta == 0 else f"ddim(eta={eta:g})"

    def local_coefficients(
        self, xp: Any, order: int, lam: Sequence[Any], alpha: Sequence[Any], sigma: Sequence[Any]
    ) -> LocalCoefficients:
        """Eq. 12/16 from the current point (λ_s, α_s, σ_s) to the target (λ_t, α_t, σ_t)."""
        h = lam[0] - lam[1]
        keep = xp.sqrt(1.0 - self.eta**2 * -xp.expm1(-2.0 * h))  # √(σ_t² − c²)/σ_t
        c_x = sigma[0] * keep / sigma[1]
        c_z = self.eta * sigma[0] * xp.sqrt(-xp.expm1(-2.0 * h))
        return c_x, (alpha[0] - c_x * alpha[1],), c_z

    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        lam, alpha, sigma = marginals(process, sigmas)
        c_x, (c_0,), c_z = self.local_coefficients(
            np, 1, (lam[1:], lam[:-1]), (alpha[1:], alpha[:-1]), (sigma[1:], sigma[:-1])
        )
        steps = [
            LinearStep(x=float(c_x[k]), history=(float(c_0[k]),), noise=float(c_z[k])) for k in range(sigmas.size - 1)
        ]
        return np.asarray(sigmas[:-1], dtype=np.float64), steps, 1
