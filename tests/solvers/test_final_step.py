"""The last step to σ̃ = 0 (diffsamplers.solvers.final_step): the solver's own, the ODE's limit, or a κ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffsamplers.apps.recipes import parse_solver
from diffsamplers.metrics.errors import rms_error
from diffsamplers.models.gmm import GaussianMixture, reference_solution
from diffsamplers.noise import DiscreteVP
from diffsamplers.sampling import initial_noise, sample
from diffsamplers.schedules import from_sigmas, uniform_logsnr
from diffsamplers.solvers import DDIM, DCSolver, DPMSolverPlusPlus, ExposureBiasTimeShift, UniPC
from diffsamplers.solvers.final_step import check_final_step

PROCESS = DiscreteVP.from_beta_schedule("scaled_linear", 0.00085, 0.012, 1000)


def _single_gaussian(var: float, dim: int = 16) -> GaussianMixture:
    return GaussianMixture.isotropic(dim, 1, math.sqrt(var), std_spread=(1.0, 1.0), mean_scale=0.5, seed=3)


@pytest.mark.parametrize("kappa", ["midpoint", 0.0, 0.3])
def test_last_step_is_the_stated_combination(kappa: str | float) -> None:
    """One step from σ̃_s to 0: x_0 = α_0 (κ y_s + (1 − κ) x̂0), y_s = x_s/α_s (κ = ½ for "midpoint")."""
    gmm = _single_gaussian(0.04)
    den = gmm.as_denoiser(PROCESS)
    sigma_s = 0.1
    schedule = from_sigmas(PROCESS, [sigma_s, 0.0])
    x_s = initial_noise(PROCESS, sigma_s, (8, 16), 0, dtype=torch.float64) + 0.3
    out = sample(den, DDIM().with_final_step(kappa), schedule, x_T=x_s, dtype=torch.float64, progress=False)
    alpha = float(PROCESS.alpha_sigma(sigma_s)[0])
    d = den(x_s, float(PROCESS.t_from_sigma_tilde(sigma_s)))
    k = 0.5 if kappa == "midpoint" else float(kappa)
    torch.testing.assert_close(out, k * x_s / alpha + (1 - k) * d, rtol=1e-12, atol=1e-12)


def test_midpoint_is_the_ode_limit_on_a_gaussian() -> None:
    """From the exact state at σ̃_s, the exact endpoint is μ + √(λ/(λ+σ̃²))(y − μ): the first-order update's error
    is (1 − κ(u))·|y − D|-like, O(σ̃²), the midpoint's O(σ̃⁴) — measured: ratio of errors ≈ u/4 for small u."""
    var, sigma_s = 0.04, 0.05
    gmm = _single_gaussian(var)
    den = gmm.as_denoiser(PROCESS)
    x_s = initial_noise(PROCESS, sigma_s, (32, 16), 1, dtype=torch.float64)
    exact = reference_solution(gmm, PROCESS, x_s, sigma_s, 0.0)
    schedule = from_sigmas(PROCESS, [sigma_s, 0.0])
    errors = {
        f: rms_error(
            sample(den, DDIM().with_final_step(f), schedule, x_T=x_s, dtype=torch.float64, progress=False), exact
        )
        for f in ("solver", "midpoint")
    }
    u = sigma_s**2 / var
    kappa = (math.sqrt(1 + u) - 1) / u  # the exact fraction for one Gaussian
    # y − D = u/(1+u)·(y − μ); the endpoint is D + κ(y − D): errors |κ|·|y−D| and |κ − ½|·|y−D|
    assert errors["midpoint"] / errors["solver"] == pytest.approx((0.5 - kappa) / kappa, rel=1e-3)
    assert errors["midpoint"] < errors["solver"] * u / 2


def test_midpoint_cuts_the_few_step_error_on_a_mixture() -> None:
    gmm = GaussianMixture.isotropic(64, 6, 0.15, seed=4)
    den = gmm.as_denoiser(PROCESS)
    x_T = initial_noise(PROCESS, PROCESS.sigma_max, (32, 64), 0)
    exact = reference_solution(gmm, PROCESS, x_T.double(), PROCESS.sigma_max, 0.0)
    schedule = uniform_logsnr(PROCESS, 8)
    for solver in (DPMSolverPlusPlus(2), UniPC()):
        own = rms_error(sample(den, solver, schedule, x_T=x_T, progress=False), exact)
        mid = rms_error(sample(den, solver.with_final_step("midpoint"), schedule, x_T=x_T, progress=False), exact)
        assert mid < own / 2


def test_only_the_last_step_changes_and_only_at_zero() -> None:
    solver = UniPC()
    mid = solver.with_final_step("midpoint")
    schedule = uniform_logsnr(PROCESS, 6)
    a, b = solver.plan(PROCESS, schedule), mid.plan(PROCESS, schedule)
    assert a.steps[:-1] == b.steps[:-1] and a.steps[-1] != b.steps[-1]
    assert b.steps[-1].corrector == a.steps[-1].corrector  # UniPC's corrector at the last point is kept
    ending_above_zero = uniform_logsnr(PROCESS, 6, final="sigma_min")
    assert solver.plan(PROCESS, ending_above_zero).steps == mid.plan(PROCESS, ending_above_zero).steps
    assert solver.final_step == "solver"  # the original is unchanged


def test_dc_solver_keeps_its_final_step_with_new_ratios() -> None:
    dc = DCSolver().with_final_step(0.4)
    assert dc.with_ratios([1.0, 1.0, 1.2, 0.9]).final_step == 0.4


def test_specs_take_final_step() -> None:
    assert parse_solver("unipc:final_step=midpoint").build().final_step == "midpoint"
    assert parse_solver("dpm++2m:final_step=0.45").build().final_step == 0.45
    dc = parse_solver("dc-solver:search,final_step=midpoint")
    assert dc.ratios == "search" and dc.build(search=lambda s: None).final_step == "midpoint"
    with pytest.raises(ValueError, match="final_step"):
        parse_solver("unipc:final_step=midpoint+ts").build()


@pytest.mark.parametrize("bad", ["middle", 1.0, -0.1, math.nan, True, None])
def test_bad_final_steps_are_refused(bad: object) -> None:
    with pytest.raises((ValueError, TypeError), match="final_step"):
        check_final_step(bad)


def test_time_shift_refuses_a_final_step() -> None:
    with pytest.raises(TypeError, match="final_step"):
        ExposureBiasTimeShift(DPMSolverPlusPlus(2)).with_final_step("midpoint")


def test_kappa_grid_values_are_floats() -> None:
    assert check_final_step("0.25") == 0.25 and isinstance(check_final_step(np.float64(0.2)), float)
