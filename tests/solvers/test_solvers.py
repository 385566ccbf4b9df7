"""Solver identities, coefficient sanity, thresholding and host-sync freedom."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffsamplers import (
    DDIM,
    Denoiser,
    DPMSolverPlusPlus,
    DPMSolverPlusPlusSinglestep,
    DynamicThresholding,
    Euler,
    sample,
)
from diffsamplers.diagnostics import HostReadCounter
from diffsamplers.models.gmm import default_mixture, default_process
from diffsamplers.noise import VarianceExploding
from diffsamplers.schedules import karras, uniform_logsnr, uniform_time
from diffsamplers.solvers.dpm_solver_pp_singlestep import singlestep_orders

PROCESS = default_process()
GMM = default_mixture()


def _run(solver, schedule, x_T, **kw):
    return sample(GMM.as_denoiser(PROCESS), solver, schedule, x_T=x_T, dtype=torch.float64, progress=False, **kw)


@pytest.fixture
def x_T():
    return torch.randn(6, *GMM.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_ddim_equals_first_order_dpm_and_euler(x_T):
    sched = uniform_time(PROCESS, 12)
    ddim = _run(DDIM(), sched, x_T)
    assert torch.allclose(ddim, _run(DPMSolverPlusPlus(1), sched, x_T), atol=1e-12)
    assert torch.allclose(ddim, _run(Euler(), sched, x_T), atol=1e-12)


def test_plan_coefficients_are_host_floats_and_consistent():
    plan = DPMSolverPlusPlus(3).plan(PROCESS, uniform_logsnr(PROCESS, 10))
    assert plan.num_evals == 10 and plan.history_size == 3
    assert plan.orders == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]  # warm-up, then lower order at the end (< 15 steps)
    for step in plan.steps:
        assert all(isinstance(c, float) for c in (step.x, *step.history, step.noise))
        # A constant x̂0 must be reproduced exactly: the coefficients of the history add up to the
        # first-order weight α_t (1 − e^{−h}).
    for k, step in enumerate(plan.steps):
        h = math.log(plan.sigmas[k] / plan.sigmas[k + 1]) if plan.sigmas[k + 1] > 0 else math.inf
        assert sum(step.history) == pytest.approx(plan.alpha_t[k + 1] * -math.expm1(-h), rel=1e-12)
        assert step.x == pytest.approx(plan.sigma_t[k + 1] / plan.sigma_t[k], rel=1e-12)


def test_final_step_to_zero_returns_the_prediction(x_T):
    """Into σ = 0 every solver's last update is x̂0 itself (λ = ∞)."""
    for solver in (
        DDIM(),
        DPMSolverPlusPlus(2),
        DPMSolverPlusPlus(3),
        DPMSolverPlusPlusSinglestep(3),
        DPMSolverPlusPlus(2, sde=True),
    ):
        plan = solver.plan(PROCESS, uniform_time(PROCESS, 7))
        last = plan.steps[-1]
        assert last.x == 0.0 and last.history[0] == pytest.approx(1.0) and all(c == 0 for c in last.history[1:])
        assert last.noise == 0.0


def test_singlestep_order_mix():
    assert singlestep_orders(6, 3, final_zero=False) == [3, 2, 1]
    assert singlestep_orders(7, 3, final_zero=False) == [3, 3, 1]
    assert singlestep_orders(8, 3, final_zero=True) == [3, 3, 1, 1]
    assert singlestep_orders(6, 2, final_zero=True) == [2, 2, 1, 1]
    assert singlestep_orders(5, 2, final_zero=False) == [2, 2, 1]
    for n in range(1, 30):
        for order in (1, 2, 3):
            assert sum(singlestep_orders(n, order, final_zero=True)) == n


def test_sde_is_reproducible_and_matches_ddim_eta_one_at_first_order(x_T):
    sched = uniform_logsnr(PROCESS, 15, final="sigma_min")
    a = _run(DPMSolverPlusPlus(1, sde=True), sched, x_T, seeds=list(range(6)))
    b = _run(DDIM(eta=1.0), sched, x_T, seeds=list(range(6)))
    assert torch.allclose(a, b, atol=1e-10)
    c = _run(DPMSolverPlusPlus(2, sde=True), sched, x_T, seeds=list(range(6)))
    d = _run(DPMSolverPlusPlus(2, sde=True), sched, x_T, seeds=list(range(6)))
    assert torch.equal(c, d) and not torch.allclose(c, a)


def test_euler_churn_adds_noise_and_raises_noise_levels():
    ve = VarianceExploding(0.002, 80.0)
    sched = karras(ve, 10, final="append_zero")
    plan = Euler(s_churn=10.0, s_tmin=0.05, s_tmax=50.0).plan(ve, sched)
    assert plan.stochastic
    churned = [k for k in range(10) if plan.sigmas[k] > sched.sigmas[k]]
    assert churned and all(0.05 <= sched.sigmas[k] <= 50.0 for k in churned)
    with pytest.raises(ValueError, match="outside the model's noise range"):
        Euler(s_churn=10.0).plan(ve, sched)  # churn at σ_max leaves the trained range


@pytest.mark.parametrize("ratio, max_value", [(0.995, 1.0), (0.87, 1.5), (0.5, 3.0)])
def test_dynamic_thresholding_matches_diffusers(ratio, max_value):
    ref = DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    x0 = 2.0 * torch.randn(5, 3, 7, 9, generator=torch.Generator().manual_seed(1))
    ours = DynamicThresholding(ratio, max_value)(x0)
    assert torch.allclose(ours, ref._threshold_sample(x0), atol=1e-6)


def test_state_reindexing_gathers_history():
    solver = DPMSolverPlusPlus(2)
    plan = solver.plan(PROCESS, uniform_time(PROCESS, 5))
    state = solver.init_state()
    x = torch.randn(4, 1, 8, 8)
    for k in range(2):
        x = solver.step(plan, state, k, x, x0=torch.arange(4.0).view(4, 1, 1, 1).expand_as(x) + k)
    picked = state.index_select(torch.tensor([3, 3, 0, 1]))
    assert [float(h[0, 0, 0, 0]) for h in picked.history] == [3.0, 4.0]
    assert [float(h[2, 0, 0, 0]) for h in picked.history] == [0.0, 1.0]


def test_update_runs_in_float32_for_half_inputs():
    solver = DPMSolverPlusPlus(2)
    plan = solver.plan(PROCESS, uniform_time(PROCESS, 3))
    out = solver.step(
        plan, solver.init_state(), 0, torch.randn(2, 3, dtype=torch.float16), torch.randn(2, 3, dtype=torch.bfloat16)
    )
    assert out.dtype == torch.float32


class _Linear(torch.nn.Module):
    def forward(self, x, t):
        return 0.1 * x


@pytest.mark.parametrize(
    "solver",
    [
        DDIM(),
        DDIM(eta=0.5),
        DPMSolverPlusPlus(2),
        DPMSolverPlusPlus(3),
        DPMSolverPlusPlus(2, sde=True),
        DPMSolverPlusPlusSinglestep(3),
        DPMSolverPlusPlus(2, thresholding=DynamicThresholding(0.9, 1.5)),
    ],
    ids=lambda s: s.name,
)
def test_sampling_loop_reads_nothing_back_from_the_device(solver):
    """No device→host read per step; with NaN checking exactly one, after the last step."""
    den = Denoiser(_Linear(), PROCESS, "epsilon")
    with HostReadCounter() as off:
        sample(
            den,
            solver,
            25,
            (4, 3, 16, 16),
            generator=torch.Generator().manual_seed(0),
            progress=False,
            check_finite=False,
        )
    assert off.total == 0, dict(off.counts)
    with HostReadCounter() as on:
        sample(den, solver, 25, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), progress=False)
    assert 1 <= on.total <= 2, dict(on.counts)  # the end-of-chunk flag read (+ its nonzero on the CPU copy)


def test_sampling_loop_runs_on_the_meta_device():
    """Meta tensors have no data: any host read would raise. The whole loop runs on them."""
    den = Denoiser(_Linear(), PROCESS, "epsilon")
    out = sample(den, DPMSolverPlusPlus(3), 20, (2, 3, 8, 8), device="meta", progress=False, check_finite=False)
    assert out.device.type == "meta" and out.shape == (2, 3, 8, 8)


def test_diffusers_dpm_solver_does_read_back():
    """The same counter sees diffusers' per-run lookups (it is not blind)."""
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    with HostReadCounter() as counter:
        for t in sched.timesteps:
            x = sched.step(0.1 * x, t, x).prev_sample
    assert counter.total >= 1


def test_plan_is_float64_and_ignores_device_values():
    plan = DPMSolverPlusPlus(2).plan(PROCESS, uniform_logsnr(PROCESS, 8))
    assert plan.sigmas.dtype == np.float64 and plan.alpha_t.dtype == np.float64


@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
def test_third_order_forms_on_a_quadratic_prediction(sde):
    """With x̂0 exactly quadratic in λ the Taylor 3M update is exact; the reference forms are not.

    The deterministic part of one update is compared with the exact integral (SciPy quad): for the ODE,
    x_t = (σ_t/σ_s) x_s + α_t ∫_0^h e^{u−h} x̂0(λ_s + u) du; for the SDE's mean,
    (σ_t/σ_s) e^{−h} x_s + 2 α_t ∫_0^h e^{−2(h−u)} x̂0(λ_s + u) du.
    """
    from scipy.integrate import quad

    sched = uniform_logsnr(PROCESS, 40, final="sigma_min")
    f = lambda lam: 0.3 + 0.2 * lam + 0.05 * lam * lam  # noqa: E731
    errors = {}
    for form in ("taylor", "reference"):
        plan = DPMSolverPlusPlus(3, sde=sde, third_order=form).plan(PROCESS, sched)
        lam, k, x = -np.log(plan.sigmas), 20, 0.7
        step = plan.steps[k]
        update = step.x * x + sum(c * f(lam[k - j]) for j, c in enumerate(step.history))
        h = lam[k + 1] - lam[k]
        if sde:
            integral = 2 * quad(lambda u, h=h, s=lam[k]: math.exp(-2 * (h - u)) * f(s + u), 0, h, epsabs=1e-15)[0]
            exact = plan.sigma_t[k + 1] / plan.sigma_t[k] * math.exp(-h) * x + plan.alpha_t[k + 1] * integral
        else:
            integral = quad(lambda u, h=h, s=lam[k]: math.exp(u - h) * f(s + u), 0, h, epsabs=1e-15)[0]
            exact = plan.sigma_t[k + 1] / plan.sigma_t[k] * x + plan.alpha_t[k + 1] * integral
        errors[form] = abs(update - exact)
        second_order_term = plan.alpha_t[k + 1] * 0.05 * h * h / 2  # size of the ½ x̂0″ h² contribution
    assert errors["taylor"] < 1e-12
    if sde:  # diffusers' SDE weight is off by α_t·D2: an O(h²) error as large as the term itself
        assert errors["reference"] > 0.5 * second_order_term
    else:  # the official/diffusers ODE weight is half the Taylor one: an O(h³) error
        assert 1e-3 * second_order_term < errors["reference"] < 0.1 * second_order_term


@pytest.mark.gpu
def test_no_cuda_synchronisation_in_the_loop():
    """On a GPU: zero synchronising calls per 25-step loop (one, after the last step, with the NaN check)."""
    from diffsamplers.diagnostics import count_cuda_syncs

    den = Denoiser(_Linear(), PROCESS, "epsilon")
    x_T = torch.randn(4, 4, 64, 64, device="cuda")
    for solver in (DPMSolverPlusPlus(2), DPMSolverPlusPlus(3), DPMSolverPlusPlus(2, sde=True)):
        gen = torch.Generator("cuda").manual_seed(0)
        run = lambda: sample(den, solver, 25, x_T=x_T, generator=gen, progress=False, check_finite=False)  # noqa: B023, E731
        run()  # warm up (plan, allocator)
        assert count_cuda_syncs(run)[1] == 0
        checked = lambda: sample(den, solver, 25, x_T=x_T, generator=gen, progress=False)  # noqa: B023, E731
        assert count_cuda_syncs(checked)[1] <= 1
