"""The one reference solution: its grid contains every target level, it is uniform in λ between them, and its
accuracy against SciPy on the bundled mixture is the one its docstring states."""

import numpy as np
import pytest
import torch

from diffsamplers.models.gmm import default_mixture, default_process, reference_solution
from diffsamplers.reference import reference_samples, reference_trajectories, reference_trajectory, refine_schedule
from diffsamplers.sampling import initial_noise
from diffsamplers.schedules import Schedule, diffusers_spacing, uniform_logsnr
from tests.helpers import SMOOTH_MIXTURE, rms

pytestmark = pytest.mark.usefixtures("single_thread")

PROCESS = default_process()


@pytest.mark.parametrize(
    "schedule",
    [
        diffusers_spacing(PROCESS, 5),
        diffusers_spacing(PROCESS, 8, final="sigma_min"),
        uniform_logsnr(PROCESS, 6),
        uniform_logsnr(PROCESS, 7, final="sigma_min"),
    ],
    ids=["linspace-zero", "linspace-sigma_min", "logsnr-zero", "logsnr-sigma_min"],
)
def test_refined_schedule_contains_the_targets_and_is_uniform_in_lambda(schedule):
    fine, index = refine_schedule(PROCESS, schedule, 1000)
    assert 990 <= fine.num_steps <= 1010
    assert np.array_equal(fine.sigmas[index], schedule.sigmas)
    assert np.array_equal(fine.timesteps[index[:-1]], schedule.model_timesteps(PROCESS))
    lam = -np.log(fine.sigmas[fine.sigmas > 0])
    for a, b in zip(index[:-1], index[1:]):  # equal λ steps inside every target interval (down to σ_min)
        steps = np.diff(lam[a : min(b, lam.size - 1) + 1])
        if steps.size > 1:
            assert np.allclose(steps, steps[0], rtol=1e-9)
    if schedule.sigmas[-1] == 0.0:  # integrated to σ_min, then the final jump
        assert fine.sigmas[-2] == pytest.approx(PROCESS.sigma_min, rel=1e-12)


def test_accuracy_against_scipy_on_the_bundled_mixture():
    """The stated accuracy: 5.6e-8 RMS from σ_max to σ_min with 1,000 steps (samples of RMS ≈ 1); measured here
    on 16 of the 64 noises of that measurement's seed."""
    gmm = default_mixture()
    den = gmm.as_denoiser(PROCESS)
    x_T = initial_noise(PROCESS, PROCESS.sigma_max, (16, *gmm.sample_shape), 0, dtype=torch.float64)
    schedule = Schedule(np.array([PROCESS.sigma_max, PROCESS.sigma_min]))
    exact = reference_solution(gmm, PROCESS, x_T, PROCESS.sigma_max, PROCESS.sigma_min)
    assert rms(reference_samples(den, x_T, schedule=schedule), exact) < 1e-7
    coarse = rms(reference_samples(den, x_T, schedule=schedule, steps=250), exact)
    assert 1e-7 < coarse < 1e-5  # third order: 4× fewer steps, ~64× the error
    # down to σ = 0 the final jump x̂0(σ_min) differs from the ODE below σ_min, as every sampler's does
    to_zero = reference_samples(den, x_T)
    jump = gmm.as_denoiser(PROCESS)(exact, PROCESS.t_min)
    assert rms(to_zero, jump) < 1e-6


def test_states_match_the_exact_solution():
    schedule = diffusers_spacing(PROCESS, 6, final="sigma_min")
    x_T = torch.randn(4, *SMOOTH_MIXTURE.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = reference_trajectory(SMOOTH_MIXTURE.as_denoiser(PROCESS), schedule, x_T)
    assert rows.shape == (7, *x_T.shape) and rows.dtype == torch.float64 and torch.equal(rows[0], x_T)
    for k in (2, 4, 6):
        exact = reference_solution(SMOOTH_MIXTURE, PROCESS, x_T, float(schedule.sigmas[0]), float(schedule.sigmas[k]))
        assert float((rows[k] - exact).abs().max()) < 1e-6  # (the time-uniform grid used before: 2e-4)


def test_one_run_serves_several_schedules():
    den = SMOOTH_MIXTURE.as_denoiser(PROCESS)
    x_T = torch.randn(3, *SMOOTH_MIXTURE.sample_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    schedules = [diffusers_spacing(PROCESS, n, final="sigma_min") for n in (5, 8)]
    together = reference_trajectories(den, schedules, x_T)
    for sched, rows in zip(schedules, together):
        assert torch.allclose(rows, reference_trajectory(den, sched, x_T), atol=1e-9)
    with pytest.raises(ValueError, match="start at the same noise level"):
        reference_trajectories(den, [schedules[0], uniform_logsnr(PROCESS, 5, sigma_max=10.0)], x_T)
    with pytest.raises(ValueError, match="at least as many steps as the target"):
        refine_schedule(PROCESS, schedules[1], 5)
