"""Euler–Maruyama on the reverse SDE: its coefficients against the VE-form formula, DDPM's mean with a larger noise,
a noise-free last step, and convergence in distribution to an exact 1-D Gaussian mixture as the steps grow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffsamplers import DDIM, EulerMaruyama, sample
from diffsamplers.models.gmm import GaussianMixture, default_process
from diffsamplers.schedules import uniform_logsnr

pytestmark = pytest.mark.usefixtures("single_thread")

PROCESS = default_process()
WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([-1.0, 0.3, 1.5])
VARIANCES = np.array([0.05, 0.02, 0.1])


def test_coefficients_are_the_left_point_step_of_the_reverse_sde():
    sched = uniform_logsnr(PROCESS, 8)
    em, ddpm = EulerMaruyama().plan(PROCESS, sched), DDIM(eta=1.0).plan(PROCESS, sched)
    assert em.stochastic and em.steps[-1].noise == 0.0 and em.steps[-1].history[0] == pytest.approx(1.0)
    for k in range(7):
        s, t = em.sigmas[k], em.sigmas[k + 1]
        a_s, a_t = em.alpha_t[k], em.alpha_t[k + 1]
        step = em.steps[k]
        # y' = y + (s² − t²)(D − y)/s² + √(s² − t²) z with y = x/α
        assert step.x == pytest.approx(a_t * t**2 / (s**2 * a_s), rel=1e-12)
        assert step.history[0] == pytest.approx(a_t * (1 - t**2 / s**2), rel=1e-12)
        assert step.noise == pytest.approx(a_t * math.sqrt(s**2 - t**2), rel=1e-12)
        # DDPM's posterior mean, a larger noise
        assert step.x == pytest.approx(ddpm.steps[k].x, rel=1e-9)
        assert step.history[0] == pytest.approx(ddpm.steps[k].history[0], rel=1e-9)
        assert step.noise > ddpm.steps[k].noise


@pytest.mark.parametrize("steps, tolerance", [(200, 0.03)])
def test_converges_in_distribution_to_the_exact_mixture(steps: int, tolerance: float):
    gmm = GaussianMixture.from_covariances(MEANS.reshape(3, 1), VARIANCES.reshape(3, 1, 1), WEIGHTS)
    denoiser = gmm.as_denoiser(PROCESS)
    n = 4000
    coarse, fine = (
        sample(
            denoiser,
            EulerMaruyama(),
            uniform_logsnr(PROCESS, m),
            shape=(n, 1),
            generator=torch.Generator().manual_seed(0),
            dtype=torch.float64,
            progress=False,
        ).flatten()
        for m in (10, steps)
    )
    edges = torch.tensor((MEANS[1:] + MEANS[:-1]) / 2)

    def bins(x: torch.Tensor) -> np.ndarray:
        return np.bincount(torch.bucketize(x, edges).numpy(), minlength=3) / x.numel()

    mean = float((WEIGHTS * MEANS).sum())
    var = float((WEIGHTS * (VARIANCES + MEANS**2)).sum()) - mean**2
    assert np.abs(bins(fine) - WEIGHTS).max() < tolerance
    assert abs(float(fine.mean()) - mean) < 0.05 and abs(float(fine.var()) / var - 1) < 0.05
    # a coarse grid is visibly off: the left-point step's error is first order in the step
    assert abs(float(coarse.var()) / var - 1) > abs(float(fine.var()) / var - 1)
