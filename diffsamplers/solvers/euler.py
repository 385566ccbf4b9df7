"""Euler on the probability-flow ODE in EDM coordinates, with optional churn (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 2 with the Heun correction off).

In y = x/α and σ̃ the ODE is dy/dσ̃ = (y − D)/σ̃ (Eq. 3–4). One Euler step from σ̂_k to σ̃_{k+1} is
y' = (σ̃_{k+1}/σ̂_k) y + (1 − σ̃_{k+1}/σ̂_k) D. With churn, the noise level is raised before each evaluation,
σ̂ = σ̃(1 + γ), γ = min(S_churn/N, √2 − 1) for σ̃ ∈ [S_tmin, S_tmax], by adding S_noise √(σ̂² − σ̃²) z, and
the model is evaluated at σ̂ (Alg. 2, lines 4–7). Without churn the update equals DDIM (η = 0) in exact
arithmetic, which the tests check.
"""

from __future__ import annotations

import math

import numpy as np

from ..noise import NoiseProcess
from .base import LinearStep, Solver

__all__ = ["Euler"]


class Euler(Solver):
    """Euler (Karras et al. 2022, Alg. 2 without the second-order correction)."""

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
        super().__init__()
        if s_churn < 0 or s_noise < 0:
            raise ValueError(f"s_churn and s_noise must be non-negative, got {s_churn} and {s_noise}")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = (
            float(s_churn),
            float(s_tmin),
            float(s_tmax),
            float(s_noise),
        )
        self.name = "euler" if s_churn == 0 else f"euler(churn={s_churn:g})"

    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        n = sigmas.size - 1
        gamma = np.where(
            (sigmas[:-1] >= self.s_tmin) & (sigmas[:-1] <= self.s_tmax), min(self.s_churn / n, math.sqrt(2) - 1), 0.0
        )
        hat = sigmas[:-1] * (1.0 + gamma)  # evaluation levels σ̂_k
        alpha_hat, _ = process.alpha_sigma(hat)
        steps = []
        for k in range(n):
            nxt = sigmas[k + 1]
            if k + 1 < n:
                level, churn = hat[k + 1], self.s_noise * math.sqrt(max(hat[k + 1] ** 2 - nxt**2, 0.0))
            else:
                level, churn = nxt, 0.0
            a_next = float(process.alpha_sigma(level)[0])
            ratio = nxt / hat[k]
            steps.append(
                LinearStep(
                    x=float(a_next * ratio / alpha_hat[k]),
                    history=(float(a_next * (1 - ratio)),),
                    noise=float(a_next * churn),
                )
            )
        return hat, steps, 1
