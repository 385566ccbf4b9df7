"""Euler–Maruyama on the reverse-time SDE (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", Eq. 6, discretised as in their Alg. "reverse diffusion predictor" for the VE SDE).

In y = x/α and σ̃ every forward process is the VE SDE dy = √(dσ̃²/dt) dW, whose reverse is
dy = −(dσ̃²/dt) ∇log p(y) dt + √(dσ̃²/dt) dW̄, with the score ∇log p(y) = (D − y)/σ̃² (Tweedie). One
Euler–Maruyama step from σ̃_k to σ̃_{k+1} takes the drift and the noise at the left point:

    y' = y + (σ̃_k² − σ̃_{k+1}²) (D − y)/σ̃_k² + √(σ̃_k² − σ̃_{k+1}²) z,

i.e. y' = (σ̃_{k+1}²/σ̃_k²) y + (1 − σ̃_{k+1}²/σ̃_k²) D + √(σ̃_k² − σ̃_{k+1}²) z. It has DDPM's mean (DDIM with
η = 1) and a larger noise, √(σ̃_k² − σ̃_{k+1}²) instead of σ̃_{k+1}√(1 − σ̃_{k+1}²/σ̃_k²). A step to σ̃ = 0 returns
D without noise (the usual final denoising step). This is the sampler the Feynman–Kac corrector weights are
derived on (Skreta et al. 2025, Sec. 3), first order in the step (strong order ½).
"""

from __future__ import annotations

import numpy as np

from ..noise import NoiseProcess
from .base import LinearStep, Solver, marginals

__all__ = ["EulerMaruyama"]


class EulerMaruyama(Solver):
    """Euler–Maruyama on the reverse SDE (module docstring); stochastic at every step but one to σ̃ = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "euler-maruyama"

    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        _, alpha, _ = marginals(process, sigmas)
        steps = []
        for k in range(sigmas.size - 1):
            s, t = float(sigmas[k]), float(sigmas[k + 1])
            ratio = (t / s) ** 2
            a_s, a_t = float(alpha[k]), float(alpha[k + 1])
            noise = a_t * float(np.sqrt(max(s * s - t * t, 0.0))) if t > 0 else 0.0
            steps.append(LinearStep(x=a_t * ratio / a_s, history=(a_t * (1.0 - ratio),), noise=noise))
        return np.asarray(sigmas[:-1], dtype=np.float64), steps, 1
