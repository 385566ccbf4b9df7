"""Orders of convergence against the exact probability-flow ODE solution of a Gaussian mixture.

Errors are RMS over 16 samples at σ_min after integrating from σ_max on a uniform-logSNR grid, in float64.
The fitted slope of log(error) against log(NFE) over NFE 10–100 estimates the global order.
"""

import numpy as np
import pytest
import torch

from diffsamplers import DDIM, DPMSolverPlusPlus, DPMSolverPlusPlusSinglestep, Euler, sample
from diffsamplers.models.gmm import GaussianMixture, default_mixture, default_process, reference_solution
from diffsamplers.schedules import uniform_logsnr
from tests.helpers import SMOOTH_MIXTURE, fitted_slope, rms

PROCESS = default_process()
NFES = [10, 14, 20, 28, 40, 56, 80, 100]
MIXTURE = SMOOTH_MIXTURE


@pytest.fixture(scope="module")
def problem():
    x_T = torch.randn(16, *MIXTURE.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_solution(MIXTURE, PROCESS, x_T, PROCESS.sigma_max, PROCESS.sigma_min)
    return x_T, ref


def _errors(solver, x_T, ref, nfes=NFES, mixture=MIXTURE):
    den = mixture.as_denoiser(PROCESS)
    return [
        rms(
            sample(
                den, solver, uniform_logsnr(PROCESS, n, final="sigma_min"), x_T=x_T, dtype=torch.float64, progress=False
            ),
            ref,
        )
        for n in nfes
    ]


@pytest.mark.parametrize(
    "solver, low, high",
    [
        (DDIM(), 0.85, 1.15),
        (Euler(), 0.85, 1.15),
        (DPMSolverPlusPlus(1), 0.85, 1.15),
        (DPMSolverPlusPlus(2), 1.75, 2.25),
        (DPMSolverPlusPlus(2, solver_type="heun"), 1.75, 2.25),
        (DPMSolverPlusPlus(3), 2.8, 4.0),
        (DPMSolverPlusPlusSinglestep(2), 1.6, 2.3),
        (DPMSolverPlusPlusSinglestep(3), 2.6, 3.6),
    ],
    ids=lambda v: getattr(v, "name", v) if not isinstance(v, float) else str(v),
)
def test_fitted_order(problem, solver, low, high):
    x_T, ref = problem
    errors = _errors(solver, x_T, ref)
    order = -fitted_slope(NFES, errors)
    assert low <= order <= high, f"{solver.name}: fitted order {order:.2f} not in [{low}, {high}]; errors {errors}"
    assert all(b < a for a, b in zip(errors, errors[1:])), f"errors must fall with NFE: {errors}"


def test_reference_third_order_term_is_second_order():
    """The official/diffusers 3M weight halves the Taylor term: globally second order (module docstring)."""
    gaussian = GaussianMixture.random((1, 4, 4), num_components=1, seed=0, eig_range=(1e-2, 0.5))
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_solution(gaussian, PROCESS, x_T, PROCESS.sigma_max, PROCESS.sigma_min, rtol=1e-12, atol=1e-12)
    nfes = [40, 80, 160]
    taylor = _errors(DPMSolverPlusPlus(3), x_T, ref, nfes, gaussian)
    official = _errors(DPMSolverPlusPlus(3, third_order="reference"), x_T, ref, nfes, gaussian)
    local = lambda e: np.log2(e[-2] / e[-1])  # noqa: E731
    assert 1.8 <= local(official) <= 2.2, official
    assert local(taylor) >= 2.8, taylor
    assert taylor[-1] < official[-1] / 5


def test_bundled_mixture_errors_fall_and_higher_order_wins(problem):
    gmm = default_mixture()
    x_T = torch.randn(8, *gmm.sample_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = reference_solution(gmm, PROCESS, x_T, PROCESS.sigma_max, PROCESS.sigma_min)
    nfes = [20, 50, 100]
    first = _errors(DDIM(), x_T, ref, nfes, gmm)
    second = _errors(DPMSolverPlusPlus(2), x_T, ref, nfes, gmm)
    third = _errors(DPMSolverPlusPlus(3), x_T, ref, nfes, gmm)
    for errs in (first, second, third):
        assert errs[0] > errs[1] > errs[2]
    assert third[-1] < second[-1] < first[-1] / 10
