"""High-NFE reference trajectories: the fine grid contains every target level; the states match SciPy's."""

import numpy as np
import pytest
import torch

from diffsamplers.models.gmm import default_process, reference_solution
from diffsamplers.schedules import diffusers_spacing, uniform_logsnr
from diffsamplers.trajectory import reference_trajectories, reference_trajectory, refine_schedule
from tests.helpers import SMOOTH_MIXTURE

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
def test_refined_schedule_contains_the_targets(schedule):
    fine, index = refine_schedule(PROCESS, schedule, 1000)
    assert 990 <= fine.num_steps <= 1010
    assert np.array_equal(fine.sigmas[index], schedule.sigmas)
    assert np.array_equal(fine.timesteps[index[:-1]], schedule.model_timesteps(PROCESS))
    if schedule.metadata.get("spacing") == "linspace":  # diffusers' integer grids: every training timestep
        assert np.array_equal(fine.timesteps, np.arange(999, 999 - fine.num_steps, -1))


def test_states_match_the_exact_solution():
    schedule = diffusers_spacing(PROCESS, 6, final="sigma_min")
    x_T = torch.randn(4, *SMOOTH_MIXTURE.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = reference_trajectory(SMOOTH_MIXTURE.as_denoiser(PROCESS), schedule, x_T, dtype=torch.float64)
    assert rows.shape == (7, *x_T.shape) and torch.equal(rows[0], x_T)
    for k, tol in ((2, 1e-6), (4, 1e-6), (6, 2e-4)):  # the last training steps are long in λ (h ≈ 0.3)
        exact = reference_solution(SMOOTH_MIXTURE, PROCESS, x_T, float(schedule.sigmas[0]), float(schedule.sigmas[k]))
        assert float((rows[k] - exact).abs().max()) < tol


def test_one_run_serves_several_schedules():
    den = SMOOTH_MIXTURE.as_denoiser(PROCESS)
    x_T = torch.randn(3, *SMOOTH_MIXTURE.sample_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    schedules = [diffusers_spacing(PROCESS, n, final="sigma_min") for n in (5, 8)]
    together = reference_trajectories(den, schedules, x_T, dtype=torch.float64)
    for sched, rows in zip(schedules, together):
        assert torch.allclose(rows, reference_trajectory(den, sched, x_T, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="start at the same noise level"):
        reference_trajectories(den, [schedules[0], uniform_logsnr(PROCESS, 5, sigma_max=10.0)], x_T)
    with pytest.raises(ValueError, match="at least as many steps as the target"):
        refine_schedule(PROCESS, schedules[1], 5)
