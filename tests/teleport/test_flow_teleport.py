"""Gaussian teleportation on a rectified-flow model (α = 1 − t, σ = t): the teleport against the flow path's
closed form, the skip criterion from t = 1 − 10⁻⁶ (α = 10⁻⁶), and the handover on the exact mixture against the
reference."""

import math

import numpy as np
import pytest
import torch

from diffsamplers import DPMSolverPlusPlus, sample
from diffsamplers.models.gmm import default_mixture, reference_solution
from diffsamplers.noise import RectifiedFlow
from diffsamplers.reference import reference_samples
from diffsamplers.sampling import initial_noise
from diffsamplers.schedules import uniform_time
from diffsamplers.teleport.gaussian import GaussianDenoiser, GaussianTeleport, choose_skip, gaussian_flow
from diffsamplers.teleport.statistics import GaussianStatistics
from tests.helpers import rms

pytestmark = pytest.mark.usefixtures("single_thread")

#: The range of a diffusers flow config: t ∈ [10⁻⁶, 1 − 10⁻⁶] (σ̃ up to 10⁶, α_T = 10⁻⁶), timestep 1000·t.
FLOW = RectifiedFlow(t_min=1e-6, t_max=1 - 1e-6, timestep_scale=1000.0)


def _flow_closed_form(mu, lam, u, x_s, s, t):
    """The PF-ODE of N(μ, U diag(λ) Uᵀ) on the path x_t = (1 − t) x0 + t ε, written in t: the whitened
    coordinates uᵀ(x_t − (1 − t) μ)/√((1 − t)² λ + t²) are constant along it (Wang & Vastola 2024, Eq. 5)."""
    flat = x_s.reshape(x_s.shape[0], -1)
    scale = torch.sqrt(((1 - t) ** 2 * lam + t**2) / ((1 - s) ** 2 * lam + s**2))
    out = (1 - t) * mu + ((flat - (1 - s) * mu) @ u * scale) @ u.T
    return out.reshape(x_s.shape)


def test_teleport_follows_the_flow_closed_form_for_a_single_gaussian():
    """Teleporting k steps of a time-uniform flow grid lands where the closed form in t says (the flow scaling
    α = 1 − t, not VP's), and the solver runs on from there. For Gaussian data the skipped part is exact: with
    12 − k evaluations the sample ends as close to the exact one as the plain run with all 12 (this grid's error
    comes from its last, low-noise steps) and much closer than the plain run with 12 − k; measured RMS 0.01976
    plain 12, teleported 0.01989 / 0.01988 / 0.01977 at k = 2 / 4 / 6, plain 10 / 8 / 6: 0.0261 / 0.0368 / 0.0579.
    The criterion skips as much as it may: e vanishes up to the float32 rounding of the model's x̂0."""
    g = torch.Generator().manual_seed(0)
    d = 16
    u = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    lam = torch.exp(torch.linspace(math.log(0.8), math.log(0.005), d, dtype=torch.float64))
    mu = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    stats = GaussianStatistics(mu, lam, u, 0.0, (1, 4, 4))
    gauss = GaussianDenoiser(stats, FLOW)
    sched = uniform_time(FLOW, 12)
    t_grid = np.linspace(FLOW.t_max, FLOW.t_min, 13)  # the grid's times, independently of σ̃
    x_T = initial_noise(FLOW, float(sched.sigmas[0]), (8, 1, 4, 4), 0, dtype=torch.float64)
    exact = _flow_closed_form(mu, lam, u, x_T, t_grid[0], 0.0)
    full = rms(sample(gauss, DPMSolverPlusPlus(2), sched, x_T=x_T, dtype=torch.float64, progress=False), exact)
    landed: list[torch.Tensor] = []  # the state each run's solver starts from (the callback's first x)
    for k in (2, 4, 6):
        landed.clear()
        tele = GaussianTeleport(stats, skip=k).sample(
            gauss,
            DPMSolverPlusPlus(2),
            sched,
            x_T=x_T,
            dtype=torch.float64,
            progress=False,
            callback=lambda info: landed.append(info.x.clone()) if info.step == 0 else None,
        )
        assert torch.allclose(landed[0], _flow_closed_form(mu, lam, u, x_T, t_grid[0], t_grid[k]), atol=1e-12)
        assert torch.allclose(landed[0], gaussian_flow(stats, FLOW, x_T, sched.sigmas[0], sched.sigmas[k]), atol=1e-12)
        same_nfe = sample(
            gauss, DPMSolverPlusPlus(2), uniform_time(FLOW, 12 - k), x_T=x_T, dtype=torch.float64, progress=False
        )
        assert rms(tele, exact) < 1.01 * full and rms(tele, exact) < 0.8 * rms(same_nfe, exact), k
    choice = choose_skip(gauss, stats, sched, tolerance=1e-6, max_fraction=0.5)
    assert choice.skip == 6 and max(choice.errors) < 1e-8  # float32 rounding, summed over the fine grid


@pytest.mark.parametrize("steps", [12, 20])
def test_teleport_on_the_flow_mixture_saves_evaluations_at_equal_error(steps):
    """The mixture's Gaussian statistics on the flow grid: the criterion (tolerance 0.01) skips the first
    evaluations (to σ̃ = 3, t = 0.75: its level is σ̃ = 2.7); the teleported start is close to the exact flow there,
    and with the remaining N − k evaluations the sample ends as close to the reference as the plain run with all
    N, and closer than the plain run with the same N − k. Measured (64 noises): N = 12, k = 3: RMS 0.02386 against
    0.02390 (12 NFE) and 0.0684 (9 NFE); N = 20, k = 5: 0.01197 against 0.01195 (20 NFE) and 0.01785 (15 NFE).
    The criterion's integral starts at α = 10⁻³ (σ̃ = 999), not at the grid's α = 10⁻⁶."""
    gmm = default_mixture()
    den = gmm.as_denoiser(FLOW)
    stats = GaussianStatistics.from_gmm(gmm)
    sched = uniform_time(FLOW, steps)
    choice = choose_skip(den, stats, sched, tolerance=0.01)
    k = choice.skip
    assert choice.errors[0] == 0.0 and k == {12: 3, 20: 5}[steps]
    assert max(choice.errors) <= 0.01 < choice.level.errors[-1] and choice.level.sigmas[0] == pytest.approx(999.0)

    x_T = initial_noise(FLOW, float(sched.sigmas[0]), (64, *gmm.sample_shape), 2, dtype=torch.float64)
    landed = gaussian_flow(stats, FLOW, x_T[:16], float(sched.sigmas[0]), choice.sigma)
    truth = reference_solution(gmm, FLOW, x_T[:16], float(sched.sigmas[0]), choice.sigma, rtol=1e-8, atol=1e-8)
    assert rms(landed, truth) < 0.02 * float(truth.std())

    final = reference_samples(den, x_T, schedule=sched)
    tele = GaussianTeleport(stats, tolerance=0.01)
    out = tele.sample(den, DPMSolverPlusPlus(2), sched, x_T=x_T.float(), progress=False)
    assert tele.last_choice.skip == k
    plain = sample(den, DPMSolverPlusPlus(2), sched, x_T=x_T.float(), progress=False)
    same_nfe = sample(den, DPMSolverPlusPlus(2), uniform_time(FLOW, steps - k), x_T=x_T.float(), progress=False)
    assert rms(out, final) <= 1.01 * rms(plain, final)
    assert rms(out, final) < 0.95 * rms(same_nfe, final)
