"""DC-Solver's dynamic compensation: the Lagrange weights, ρ = 1 reproducing the base exactly, validation,
the plug-in on predictor-only solvers, and host-sync freedom."""

import numpy as np
import pytest
import torch

from diffsamplers import (
    DCSolver,
    Denoiser,
    DPMSolverPlusPlus,
    DPMSolverPlusPlusSinglestep,
    UniPC,
    sample,
)
from diffsamplers.diagnostics import HostReadCounter
from diffsamplers.models.gmm import default_mixture, default_process, reference_solution
from diffsamplers.schedules import diffusers_spacing, uniform_logsnr
from diffsamplers.solvers.dc_solver import compensation_times, lagrange_weights

pytestmark = pytest.mark.usefixtures("single_thread")

PROCESS = default_process()
GMM = default_mixture()


@pytest.fixture
def x_T():
    return torch.randn(6, *GMM.sample_shape, generator=torch.Generator().manual_seed(0))


def _run(solver, schedule, x_T, **kw):
    return sample(GMM.as_denoiser(PROCESS), solver, schedule, x_T=x_T, progress=False, **kw)


@pytest.mark.parametrize("times", [(700.0, 800.0, 900.0), (3.0, 2.5, 0.5, -1.0), (0.2, 0.4)])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 1.0, 1.3])
def test_lagrange_weights(times, ratio):
    """Eq. 11: a partition of unity that reproduces polynomials of degree K exactly at τ = t_{i−1} + ρ(t_i − t_{i−1})."""
    weights = lagrange_weights(ratio, times)
    tau = times[1] + ratio * (times[0] - times[1])
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    poly = np.polynomial.Polynomial([0.3, -1.1, 0.7, 0.2][: len(times)])
    assert sum(w * poly(t) for w, t in zip(weights, times)) == pytest.approx(poly(tau), abs=1e-9)
    if ratio == 1.0:
        assert weights[0] == pytest.approx(1.0) and all(abs(w) < 1e-12 for w in weights[1:])
    # the differentiable path gives the same weights and the right derivative
    rho = torch.tensor(ratio, dtype=torch.float64, requires_grad=True)
    torch_weights = lagrange_weights(rho, times)
    assert [float(w.detach()) for w in torch_weights] == pytest.approx(weights, abs=1e-12)
    value = sum(w * poly(t) for w, t in zip(torch_weights, times))
    (grad,) = torch.autograd.grad(value, rho)
    assert float(grad) == pytest.approx(poly.deriv()(tau) * (times[0] - times[1]), rel=1e-9)


@pytest.mark.parametrize(
    "base",
    [
        UniPC(2, "bh2"),
        UniPC(3, "bh1"),
        UniPC(1, "bh2", disable_corrector=[0]),
        DPMSolverPlusPlus(2),
        DPMSolverPlusPlus(3),
    ],
    ids=lambda s: s.name,
)
def test_ratio_one_is_the_base_solver_exactly(base, x_T):
    for schedule in (diffusers_spacing(PROCESS, 8), uniform_logsnr(PROCESS, 6, final="sigma_min")):
        n = schedule.num_steps
        reference = _run(base, schedule, x_T)
        assert torch.equal(_run(DCSolver(None, base), schedule, x_T), reference)
        assert torch.equal(_run(DCSolver([1.0] * n, base), schedule, x_T), reference)
        changed = _run(DCSolver([1.0, 1.0] + [1.2] * (n - 2), base), schedule, x_T)
        assert not torch.allclose(changed, reference)


def test_compensation_replaces_the_newest_prediction():
    """Feed predictions linear in time: the compensated newest one is that line at τ, and it stays stored."""
    schedule = diffusers_spacing(PROCESS, 7)
    ratios = [1.0, 1.0, 1.0, 1.0, 1.4, 1.0, 1.0]
    solver = DCSolver(ratios, DPMSolverPlusPlus(2))
    plan = solver.plan(PROCESS, schedule)
    times = PROCESS.t_from_sigma_tilde(plan.sigmas[:-1])
    np.testing.assert_allclose(times, schedule.timesteps, atol=1e-9)  # process time = diffusers' timesteps here
    state, x = solver.init_state(), torch.zeros(1, 1, dtype=torch.float64)
    line = lambda t: torch.tensor([[0.25 + 0.001 * t]], dtype=torch.float64)  # noqa: E731
    tau = times[3] + 1.4 * (times[4] - times[3])
    for k in range(6):
        x = solver.step(plan, state, k, x, line(times[k]))
        if k == 4:
            assert float(state.history[-1]) == pytest.approx(float(line(tau)), abs=1e-12)
    assert float(state.history[-2]) == pytest.approx(float(line(tau)), abs=1e-12)  # still the compensated one
    assert len(state.history) == 3  # dc_order + 1 predictions kept for DPM-Solver++ 2M
    assert plan.steps[4].compensation == pytest.approx(
        lagrange_weights(1.4, compensation_times(PROCESS, plan.sigmas[:-1], 4, 2))
    )
    assert all(not s.compensation for k, s in enumerate(plan.steps) if k != 4)


@pytest.mark.parametrize(
    "ratios, message",
    [
        ([1.0] * 7, r"7 ratios but the schedule has 8 steps"),
        ([1.0, 1.1] + [1.0] * 6, r"ratio 1 = 1.1: the first 2 steps"),
        ([1.0, 1.0, float("nan")] + [1.0] * 5, "ratio 2 is not finite"),
    ],
)
def test_bad_ratios(ratios, message, x_T):
    with pytest.raises(ValueError, match=message):
        _run(DCSolver(ratios), diffusers_spacing(PROCESS, 8), x_T)


def test_bad_settings():
    with pytest.raises(ValueError, match="dc_order must be an integer from 1 to 3"):
        DCSolver(dc_order=4)
    with pytest.raises(TypeError, match="non-DC"):
        DCSolver(base=DCSolver())
    with pytest.raises(ValueError, match="singlestep"):
        DCSolver([1.0] * 6, DPMSolverPlusPlusSinglestep(2)).plan(PROCESS, diffusers_spacing(PROCESS, 6))


def test_dc_order_one_and_three(x_T):
    schedule = diffusers_spacing(PROCESS, 8)
    for order in (1, 3):
        ratios = [1.0] * order + [1.1] * (8 - order)
        plan = DCSolver(ratios, dc_order=order).plan(PROCESS, schedule)
        assert plan.history_size == max(3, order + 1)
        # K + 1 = order + 1 predictions combined from step K on (the first K ratios are 1 and plan none)
        assert [len(s.compensation) for s in plan.steps] == [0] * order + [order + 1] * (8 - order)
        out = _run(DCSolver(ratios, dc_order=order), schedule, x_T)
        untouched = _run(DCSolver([1.0] * 8, dc_order=order), schedule, x_T)
        # ratio 1.1 moves the samples (measured RMS 0.013 for K = 1, 0.023 for K = 3), ratio 1 does not
        assert 1e-3 < float((out - untouched).pow(2).mean().sqrt()) < 0.1
        assert torch.equal(untouched, _run(DCSolver([1.0] * 8, dc_order=order).base, schedule, x_T))


class _Linear(torch.nn.Module):
    def forward(self, x, t):
        return 0.1 * x


@pytest.mark.parametrize("base", [UniPC(2), UniPC(3, "bh1"), DPMSolverPlusPlus(2)], ids=lambda s: s.name)
def test_no_host_reads_and_meta(base):
    den = Denoiser(_Linear(), PROCESS, "epsilon")
    solver = DCSolver([1.0, 1.0] + [0.9, 1.1] * 11 + [1.2], base)
    with HostReadCounter() as counter:
        sample(
            den,
            solver,
            25,
            (2, 3, 8, 8),
            generator=torch.Generator().manual_seed(0),
            progress=False,
            check_finite=False,
        )
    assert counter.total == 0, dict(counter.counts)
    assert sample(den, solver, 25, (2, 3, 8, 8), device="meta", progress=False, check_finite=False).is_meta


def test_img2img_start_with_compensation(x_T):
    """A run starting mid-schedule uses lower orders, and compensation once K + 1 predictions exist."""
    schedule = diffusers_spacing(PROCESS, 10)
    den = GMM.as_denoiser(PROCESS)

    def from_step_4(solver):
        plan = solver.plan(PROCESS, schedule)
        state, x = solver.init_state(), x_T
        for k in range(4, 10):
            x0 = den.predict_x0(x, float(plan.timesteps[k]), float(plan.alpha_t[k]), float(plan.sigma_t[k]))
            x = solver.step(plan, state, k, x, x0)
        return x, plan

    x, plan = from_step_4(DCSolver([1.0, 1.0] + [1.1] * 8))
    plain, _ = from_step_4(UniPC(2))
    assert torch.equal(from_step_4(DCSolver([1.0] * 10))[0], plain)  # ratios 1: the base, from any start
    # the ODE's solution from x_T at σ̃_4: DC-Solver's run stays near it (measured RMS 0.068, UniPC 0.072)
    exact = reference_solution(GMM, PROCESS, x_T.double(), float(plan.sigmas[4]), 0.0)
    rms = lambda a, b: float((a.double() - b.double()).pow(2).mean().sqrt())  # noqa: E731
    assert rms(x, plain) > 1e-3 and rms(x, exact) < 0.1 and rms(plain, exact) < 0.1
    # with 1 or 2 stored predictions: no compensation (it needs 3); from 3 on the planned step applies
    assert [len(s.compensation) for s in plan.steps[4].lower] == [0, 0] and len(plan.steps[4].compensation) == 3


@pytest.mark.gpu
def test_no_cuda_synchronisation_in_the_loop():
    """On a GPU: 0 synchronising calls per 25-step UniPC / DC-Solver loop, in sample() and in the scheduler."""
    from diffsamplers import DCSolverScheduler
    from diffsamplers.diagnostics import count_cuda_syncs

    den = Denoiser(_Linear(), PROCESS, "epsilon")
    x_T = torch.randn(4, 4, 64, 64, device="cuda")
    for solver in (UniPC(2), UniPC(3, "bh1"), DCSolver([1.0, 1.0] + [1.1] * 23)):
        run = lambda: sample(den, solver, 25, x_T=x_T, progress=False, check_finite=False)  # noqa: B023, E731
        run()
        assert count_cuda_syncs(run)[1] == 0, solver.name
    sched = DCSolverScheduler(dc_ratios=[1.0, 1.0] + [1.1] * 23)
    sched.check_finite = False

    def loop():
        x = x_T
        for t in sched.timesteps:
            x = sched.step(0.1 * x, t, x).prev_sample
        return x

    for counted in (False, True):
        sched.set_timesteps(25, device="cuda")  # host-side planning, outside the counted loop
        syncs = count_cuda_syncs(loop)[1] if counted else loop() is None
    assert syncs == 0
