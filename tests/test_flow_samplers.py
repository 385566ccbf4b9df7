"""The exposure-bias time shift and the guidance hooks on a rectified-flow model (α = 1 − t, σ = t, timestep
1000·t), through ``sample()``."""

import numpy as np
import pytest
import torch

from diffsamplers import DCSolver, DPMSolverPlusPlus, UniPC, sample
from diffsamplers.models.gmm import GMMDenoiser, default_mixture
from diffsamplers.noise import RectifiedFlow
from diffsamplers.reference import reference_samples
from diffsamplers.sampling import initial_noise
from diffsamplers.schedules import Schedule, uniform_time
from diffsamplers.solvers import ExposureBiasTimeShift
from diffsamplers.step import Guidance, Move, StepContext
from tests.helpers import rms

pytestmark = pytest.mark.usefixtures("single_thread")

FLOW = RectifiedFlow(t_min=1e-6, t_max=1 - 1e-6, timestep_scale=1000.0)
GMM = default_mixture()


class _Recording(GMMDenoiser):
    """The exact mixture on the flow path, recording per evaluation each sample's timestep, α and σ."""

    def __init__(self) -> None:
        super().__init__(GMM, FLOW)
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def predict_x0(self, x, timestep, alpha, sigma, cond=None, uncond=None, guidance_scale=None):
        b = x.shape[0]
        per_sample = [
            np.broadcast_to(np.asarray(v.detach().double().cpu() if isinstance(v, torch.Tensor) else v).reshape(-1), b)
            for v in (timestep, alpha, sigma)
        ]
        self.calls.append(tuple(v.astype(np.float64).copy() for v in per_sample))
        return super().predict_x0(x, timestep, alpha, sigma)


def _x_T(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return initial_noise(FLOW, FLOW.sigma_max, (n, *GMM.sample_shape), seed, dtype=dtype)


def test_time_shift_around_dpm_solver_on_flow():
    """Li et al. 2024's shift around DPM-Solver++ 2M on the flow grid: finite samples, every model timestep in
    (0, 1000) and equal to 1000·σ at the sample's own point (t = σ on the flow path), per-sample grids that fall,
    shifts only after the first update, within the window and above the cut-off; and each sample, run alone with
    plain DPM-Solver++ on the grid it visited, gives the same result (the shift's per-sample coefficients are
    the flow process's own). In float32 the shifted samples stay near the reference (measured RMS 0.0318, plain
    0.0301: the exact model has no exposure bias to correct, so the shift can only cost a little)."""
    sched = uniform_time(FLOW, 10)
    nominal = sched.model_timesteps(FLOW)
    x_T = _x_T(6, seed=0, dtype=torch.float64)
    rec = _Recording()
    shifted = ExposureBiasTimeShift(DPMSolverPlusPlus(2), half_width=60, cutoff=150)
    out = sample(rec, shifted, sched, x_T=x_T, dtype=torch.float64, progress=False)
    assert torch.isfinite(out).all()
    ts, alpha, sigma = (np.stack([call[i] for call in rec.calls], axis=1) for i in range(3))  # (samples, evals)
    assert np.all((ts > 0) & (ts < 1000)) and np.allclose(alpha + sigma, 1.0, rtol=0, atol=1e-12)
    assert np.allclose(ts, 1000.0 * sigma, rtol=0, atol=1e-3)  # the model time is the sample's own point
    assert np.all(np.diff(sigma, axis=1) < 0)
    moved = np.abs(ts - nominal) > 1e-3
    assert not moved[:, :2].any() and moved.any() and (~moved[:, 2:]).any()
    assert len(np.unique(ts[:, 3].round(3))) > 1  # the choice is per sample
    assert not moved[:, nominal <= 150].any()
    assert np.all(np.abs(ts - nominal) <= 60 * 1000 * (FLOW.t_max - FLOW.t_min) / 999 + 1e-3)
    for i in range(6):
        grid = Schedule(np.append(sigma[i] / alpha[i], 0.0), timesteps=ts[i])
        alone = sample(
            GMM.as_denoiser(FLOW), DPMSolverPlusPlus(2), grid, x_T=x_T[i : i + 1], dtype=torch.float64, progress=False
        )
        assert torch.allclose(alone, out[i : i + 1], atol=1e-10, rtol=0), i

    x_held = _x_T(64, seed=1)
    truth = reference_samples(GMM.as_denoiser(FLOW), x_held, schedule=sched)
    run = sample(GMM.as_denoiser(FLOW), shifted, sched, x_T=x_held, progress=False)  # float32, the default
    plain = sample(GMM.as_denoiser(FLOW), DPMSolverPlusPlus(2), sched, x_T=x_held, progress=False)
    assert torch.isfinite(run).all() and rms(run, plain) > 1e-3
    assert rms(run, truth) < 1.2 * rms(plain, truth) < 0.04


class _Counting(Guidance):
    """A guidance that changes nothing: it counts its three hooks, records the evaluation points and multiplies
    x̂0 by 1."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float, float]] = []
        self.guided = self.moves = 0

    def condition(self, ctx: StepContext, conditions):
        self.points.append((float(ctx.timestep), float(ctx.alpha), float(ctx.sigma)))
        return conditions

    def guide_x0(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        self.guided += 1
        return x0 * 1.0

    def transition(self, ctx: StepContext, move: Move) -> torch.Tensor:
        self.moves += 1
        return move.result


@pytest.mark.parametrize(
    "solver",
    [DPMSolverPlusPlus(2), UniPC(), DCSolver([1.0, 1.0, 1.1, 0.95, 1.05, 0.9, 1.02, 1.2])],
    ids=lambda s: s.name,
)
def test_guidance_hooks_on_flow(solver):
    """Each hook runs once per evaluation at the flow grid's points (α = 1 − t, σ = t, timestep 1000·t), and a
    guidance that changes nothing leaves the samples bit for bit as without it."""
    sched = uniform_time(FLOW, 8)
    x_T = _x_T(4, seed=2)
    den = GMM.as_denoiser(FLOW)
    hook = _Counting()
    guided = sample(den, solver, sched, x_T=x_T, guidance=hook, progress=False)
    assert torch.equal(guided, sample(den, solver, sched, x_T=x_T, progress=False))
    assert len(hook.points) == hook.guided == hook.moves == 8
    ts, alpha, sigma = np.array(hook.points).T
    t = np.linspace(FLOW.t_max, FLOW.t_min, 9)[:-1]
    assert np.allclose(sigma, t, rtol=0, atol=1e-12) and np.allclose(alpha, 1 - t, rtol=0, atol=1e-12)
    assert np.allclose(ts, 1000 * t, rtol=0, atol=1e-3)
