"""The teleport criterion e(σ̃) = RMS δy(σ̃)/σ̃ (linearised state error of the Gaussian teleport, relative to the
noise left), the level it picks, and the schedule that teleports there and then spends a given number of model
evaluations (Wang & Vastola 2024, arXiv:2412.09726)."""

import math

import numpy as np
import pytest
import torch

from diffsamplers import DPMSolverPlusPlus, sample
from diffsamplers.models.gmm import (
    GaussianMixture,
    default_flow_process,
    default_mixture,
    default_process,
    reference_solution,
)
from diffsamplers.noise import DiscreteVP
from diffsamplers.sampling import initial_noise
from diffsamplers.schedules import uniform_logsnr
from diffsamplers.teleport import (
    GaussianDenoiser,
    GaussianStatistics,
    GaussianTeleport,
    TeleportLevel,
    gaussian_flow,
    teleport_level,
    teleport_schedule,
)
from tests.helpers import rms

pytestmark = pytest.mark.usefixtures("single_thread")


def _counting(den):
    """Count the model evaluations of ``den`` (every solver and the criterion go through ``predict_x0``)."""
    calls = [0]
    inner = den.predict_x0

    def predict_x0(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    den.predict_x0 = predict_x0
    return calls


def test_criterion_vanishes_for_a_single_gaussian():
    """Where the statistics are exact the model is the Gaussian denoiser: e is float32 rounding and the level is
    the floor, on a VP process (to σ̃_min = 0.01) and on a rectified flow from α = 10⁻⁶ (a one-component mixture
    as the model)."""
    process = default_process()
    stats = GaussianStatistics.from_gmm(default_mixture())
    level = teleport_level(GaussianDenoiser(stats, process), stats, tolerance=1e-4)
    assert level.reached_floor and level.sigma == level.sigma_floor == pytest.approx(process.sigma_min)
    assert level.sigma_start == process.sigma_max and level.sigmas[0] == process.sigma_max
    assert max(level.errors) < 1e-6  # measured 1.9e-7: the model's x̂0 is float32, divided by σ̃ down to 0.01
    assert np.all(np.diff(level.sigmas) < 0) and len(level.sigmas) > 12 * math.log(157.4 / 0.01)
    with pytest.raises(ValueError, match="not above the schedule's lowest level"):
        teleport_schedule(process, level, 5)  # nothing left to evaluate

    gmm = default_mixture()
    one = GaussianMixture(gmm.means[:1], gmm.eigvals[:1], gmm.eigvecs[:1], torch.ones(1, dtype=torch.float64), (64,))
    flow = default_flow_process()
    one_stats = GaussianStatistics.from_gmm(one)
    level = teleport_level(one.as_denoiser(flow), one_stats, tolerance=1e-4, sigma_floor=0.05)
    assert level.reached_floor and level.sigma == 0.05 and max(level.errors) < 1e-6
    assert level.sigma_start == pytest.approx(1e6, rel=1e-5) and level.sigmas[0] == pytest.approx(999.0)


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
def test_state_error_estimate_matches_the_exact_flow(flow):
    """RMS δy = e·σ̃ against the measured error of the teleported state (Gaussian flow against the exact PF-ODE
    of the mixture from the same noise, in y = x/α), at a level the default tolerance accepts and one past it.
    Measured ratios estimate/measured: VP 0.99 at σ̃ = 5 and 0.93 at σ̃ = 2; flow 0.99 at 4 and 0.93 at 2."""
    gmm = default_mixture()
    process = default_flow_process() if flow else default_process()
    stats = GaussianStatistics.from_gmm(gmm)
    checks = [4.0, 2.0] if flow else [5.0, 2.0]
    level = teleport_level(gmm.as_denoiser(process), stats, tolerance=0.5, sigma_floor=1.0, levels=checks)
    estimate = dict(zip(level.sigmas, level.state_errors))
    x_T = initial_noise(process, process.sigma_max, (64, *gmm.sample_shape), 0, dtype=torch.float64)
    for s in checks:
        alpha = float(process.alpha_sigma(s)[0])
        landed = gaussian_flow(stats, process, x_T, process.sigma_max, s)
        exact = reference_solution(gmm, process, x_T, process.sigma_max, s, rtol=1e-8, atol=1e-8)
        measured = rms(landed / alpha, exact / alpha)
        assert estimate[s] == pytest.approx(measured, rel=0.25), (s, estimate[s], measured)
    assert estimate[checks[0]] / checks[0] < 0.01 < estimate[checks[1]] / checks[1]


def test_level_falls_as_tolerance_grows():
    """On the d = 768 mixture of ten isotropic components under SD 1.5's noise process the default tolerance
    stops the teleport at σ̃ = 7.5 (measured e: 8.4e-3 at 7.5, 1.5e-2 at 6.0); the level falls as the tolerance
    grows (measured 8.9, 7.5, 5.4, 3.6 for 0.005, 0.01, 0.02, 0.05)."""
    gmm = GaussianMixture.isotropic(768, 10, 0.15, seed=0)
    process = DiscreteVP.from_beta_schedule("scaled_linear", 0.00085, 0.012, 1000)
    den, stats = gmm.as_denoiser(process), GaussianStatistics.from_gmm(gmm)
    levels = [teleport_level(den, stats, tol) for tol in (0.005, 0.01, 0.02, 0.05)]
    sigmas = [lev.sigma for lev in levels]
    assert all(b < a for a, b in zip(sigmas, sigmas[1:])), sigmas
    assert 6.0 < levels[1].sigma < 9.4
    for lev in levels:
        assert lev.sigma in lev.sigmas and not lev.reached_floor
        last_ok = lev.sigmas.index(lev.sigma)
        assert max(lev.errors[: last_ok + 1]) <= lev.tolerance < lev.errors[-1] and last_ok == len(lev.sigmas) - 2
        assert lev.sigmas[0] == process.sigma_max and lev.errors[0] == 0.0
    # a stricter tolerance reads the same level off a looser one's curve, without new model calls
    loosest = levels[-1]
    for lev in levels[:-1]:
        assert loosest.at(lev.tolerance).sigma == lev.sigma and loosest.at(lev.tolerance).tolerance == lev.tolerance
    assert loosest.at(1e-9).sigma == process.sigma_max  # even the first tested level fails: no teleport
    with pytest.raises(ValueError, match="looser"):
        levels[0].at(0.05)


def test_teleport_schedule_spends_exactly_nfe_evaluations():
    gmm, process = default_mixture(), default_process()
    den, stats = gmm.as_denoiser(process), GaussianStatistics.from_gmm(gmm)
    calls = _counting(den)
    tele = GaussianTeleport(stats)  # tolerance 0.01
    level = tele.level_for(den)
    probe_calls = calls[0]
    assert probe_calls == len(level.sigmas) and isinstance(level, TeleportLevel)
    assert 2.0 < level.sigma < 3.5  # measured 2.66: 4.1 of the 9.7 units of log σ̃ teleported
    x_T = initial_noise(process, process.sigma_max, (32, *gmm.sample_shape), 0)
    for nfe in (1, 4, 7):
        calls[0] = 0
        sched = tele.schedule_for(den, nfe)
        assert calls[0] == 0  # the level is computed once per denoiser and tolerance
        assert sched.num_steps == nfe + 1 and sched.metadata["teleport_skip"] == 1
        assert sched.sigmas[0] == process.sigma_max and sched.sigmas[1] == level.sigma and sched.final_sigma == 0.0
        assert np.allclose(sched.sigmas[1:], uniform_logsnr(process, nfe, sigma_max=level.sigma).sigmas)
        for runner in (tele, GaussianTeleport(stats, skip=1)):
            calls[0] = 0
            runner.sample(den, DPMSolverPlusPlus(2), sched, x_T=x_T, progress=False)
            assert calls[0] == nfe
    for spacing in ("karras", "uniform_time", "exponential"):
        sched = teleport_schedule(process, level, 5, spacing=spacing, final="append_zero")
        calls[0] = 0
        GaussianTeleport(stats).sample(den, DPMSolverPlusPlus(2), sched, x_T=x_T, progress=False)
        assert calls[0] == 5 and sched.sigmas[1] == pytest.approx(level.sigma) and sched.sigmas[-2] > 0
    # A level at the start: nothing to teleport, the plain grid.
    plain = teleport_schedule(process, process.sigma_max, 6)
    assert plain.metadata["teleport_skip"] == 0 and np.array_equal(plain.sigmas, uniform_logsnr(process, 6).sigmas)
    calls[0] = 0
    GaussianTeleport(stats).sample(den, DPMSolverPlusPlus(2), plain, x_T=x_T, progress=False)
    assert calls[0] == 6
    # Another tolerance is another level.
    calls[0] = 0
    assert tele.level_for(den) is level and calls[0] == 0
    assert GaussianTeleport(stats, tolerance=0.05).level_for(den).sigma < level.sigma and calls[0] > 0


def test_teleport_schedule_saves_evaluations_on_the_mixture():
    """With 8 evaluations after the teleport the sample ends closer to the exact one than the plain run with 12
    (measured, 32 noises: 0.0059 against 0.0089, and 0.024 for the plain run with 8)."""
    gmm, process = default_mixture(), default_process()
    den, stats = gmm.as_denoiser(process), GaussianStatistics.from_gmm(gmm)
    x_T = initial_noise(process, process.sigma_max, (32, *gmm.sample_shape), 0)
    exact = reference_solution(gmm, process, x_T.double(), process.sigma_max, 0.0, rtol=1e-8, atol=1e-8)
    tele = GaussianTeleport(stats)
    out = tele.sample(den, DPMSolverPlusPlus(2), tele.schedule_for(den, 8), x_T=x_T, progress=False)
    plain = {n: sample(den, DPMSolverPlusPlus(2), uniform_logsnr(process, n), x_T=x_T, progress=False) for n in (8, 12)}
    assert rms(out, exact) < rms(plain[12], exact) < rms(plain[8], exact)


def test_bad_arguments_raise_clear_errors():
    gmm, process = default_mixture(), default_process()
    den, stats = gmm.as_denoiser(process), GaussianStatistics.from_gmm(gmm)
    for tol in (0.0, 1.0, -0.1, 2.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"tolerance must lie in \(0, 1\)"):
            teleport_level(den, stats, tolerance=tol)
        with pytest.raises(ValueError, match=r"tolerance must lie in \(0, 1\)"):
            GaussianTeleport(stats, tolerance=tol)
    with pytest.raises(ValueError, match="tolerance must be a number"):
        teleport_level(den, stats, tolerance="0.01")
    for nfe in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
            teleport_schedule(process, 3.0, nfe)
        with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
            GaussianTeleport(stats).schedule_for(den, nfe)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1"):
        teleport_level(den, stats, num_probes=0)
    with pytest.raises(ValueError, match="sigma_floor < sigma_start"):
        teleport_level(den, stats, sigma_start=2.0, sigma_floor=3.0)
    with pytest.raises(ValueError, match="unknown spacing 'linspace' for a teleport schedule"):
        teleport_schedule(process, 3.0, 5, spacing="linspace")
    with pytest.raises(ValueError, match="positive and finite"):
        teleport_schedule(process, math.nan, 5)
