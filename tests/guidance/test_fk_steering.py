"""FK steering (Singhal et al. 2025) on an exact 1-D Gaussian mixture: the steered particles against the reward-tilted
mixture in closed form, λ = 0 (the base sampler, bit for bit), the final correction (Π G = exp(λ r(x0))), the
schedule, determinism across batch sizes, bad rewards and bad options; the gradient proposal (the paper's Sec. 3):
the tilted target (DDIM against its exact discrete target on a grid, multistep SDE-DPM-Solver++ against the mixture),
a higher ESS than the base proposal, the weights recomputed from the path, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch

from diffsamplers import DDIM, DPMSolverPlusPlus, sample
from diffsamplers.guidance import FKSteering
from diffsamplers.models.gmm import GaussianMixture, default_process
from diffsamplers.schedules import uniform_logsnr
from diffsamplers.solvers.exposure_bias_time_shift import ExposureBiasTimeShift
from diffsamplers.step import Guidance

pytestmark = pytest.mark.usefixtures("single_thread")

WEIGHTS = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
MEANS = torch.tensor([-1.0, 0.2, 1.2], dtype=torch.float64)
VARIANCES = torch.tensor([0.04, 0.03, 0.05], dtype=torch.float64)
CENTRE, WIDTH2, LAM = 1.0, 0.5, 2.0  # r(x) = −(x − c)²/(2 s²), tilt exp(λ r)
EDGES = (MEANS[1:] + MEANS[:-1]) / 2  # the bins: one per component


def reward(x: torch.Tensor) -> torch.Tensor:
    return -((x.flatten(1) - CENTRE) ** 2).sum(1) / (2 * WIDTH2)


def tilted_mixture() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(x)·exp(λ r(x)) for p = Σ w_i N(μ_i, v_i): exp(λ r) ∝ N(x; c, s²/λ), so by the Gaussian product rule the
    weights are ∝ w_i N(c; μ_i, v_i + s²/λ), the variances 1/(1/v_i + λ/s²) and the means v'_i (μ_i/v_i + λ c/s²)."""
    v = WIDTH2 / LAM
    w = WEIGHTS * torch.exp(-((CENTRE - MEANS) ** 2) / (2 * (VARIANCES + v))) / torch.sqrt(VARIANCES + v)
    var = 1 / (1 / VARIANCES + 1 / v)
    return w / w.sum(), var * (MEANS / VARIANCES + CENTRE / v), var


def bin_probabilities(w: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    cdf = torch.stack([(w * 0.5 * torch.erfc(-(e - mu) / torch.sqrt(2 * var))).sum() for e in EDGES])
    return torch.cat([cdf[:1], cdf[1:] - cdf[:-1], 1 - cdf[-1:]])


@pytest.fixture(scope="module")
def model():
    gmm = GaussianMixture.from_covariances(MEANS.view(3, 1).numpy(), VARIANCES.view(3, 1, 1).numpy(), WEIGHTS.numpy())
    process = default_process()
    return gmm.as_denoiser(process), process


def _sample(model, n: int, guidance=None, steps: int = 30, seed: int = 0, **kwargs) -> torch.Tensor:
    denoiser, process = model
    if "seeds" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return sample(
        denoiser,
        DPMSolverPlusPlus(2, sde=True),
        uniform_logsnr(process, steps),
        shape=(n, 1),
        dtype=torch.float64,
        progress=False,
        guidance=guidance,
        **kwargs,
    ).flatten()


@pytest.mark.parametrize(
    "options",
    [
        dict(potential="difference", interval=5),
        dict(potential="difference", interval=1, ess_threshold=0.5),
        dict(potential="max", interval=5),
    ],
    ids=["difference-every-5", "difference-ess-0.5", "max-every-5"],
)
def test_particles_follow_the_tilted_mixture(model, options):
    """128 groups of K = 256: bin (component) frequencies within 0.03 and the mean within 0.035 of the exact tilted
    mixture (≈ 3 standard errors between groups plus the 30-step solver's own bias, measured at ≈ 0.01 in the mean by
    importance-weighting 2¹⁸ unsteered samples); the unsteered sampler is far off on both.

    Not exact at this K: "sum" (every 5) and "max" (every step) — their final correction exp(λ r − Σ log G) leaves a
    final ESS of ≈ 6–9 of 256, and the particles over-weight the high-reward component (mean ≈ 0.98–1.04)."""
    k, groups = 256, 128
    w, mu, var = tilted_mixture()
    target_bins, target_mean = bin_probabilities(w, mu, var), float((w * mu).sum())
    fk = FKSteering(reward, k, LAM, **options)
    x = _sample(model, k * groups, fk)
    bins = torch.bincount(torch.bucketize(x, EDGES), minlength=3).double() / x.numel()
    assert torch.allclose(bins, target_bins, atol=0.03), (bins, target_bins)
    assert abs(float(x.mean()) - target_mean) < 0.035, (float(x.mean()), target_mean)
    base = _sample(model, k * groups)
    base_bins = torch.bincount(torch.bucketize(base, EDGES), minlength=3).double() / base.numel()
    assert (base_bins - target_bins).abs().max() > 0.3 and abs(float(base.mean()) - target_mean) > 1.0
    assert fk.history[-1].index == 29 and bool(fk.history[-1].resampled.all())
    assert torch.equal(fk.log_weights, torch.zeros(groups, k, dtype=torch.float64))
    assert torch.allclose(fk.rewards, reward(x.view(-1, 1)).double())


def test_lambda_zero_is_the_base_sampler(model):
    """λ = 0 with systematic resampling: equal weights, identity ancestors, the unsteered samples bit for bit."""
    k, n = 8, 64
    fk = FKSteering(reward, k, 0.0, "difference", scheme="systematic")
    x = _sample(model, n, fk, steps=12, seeds=range(n))
    assert torch.equal(x, _sample(model, n, steps=12, seeds=range(n)))
    assert len(fk.history) == 12
    for record in fk.history:
        assert torch.equal(record.ancestors, torch.arange(n))
        assert torch.allclose(record.ess, torch.full((n // k,), float(k), dtype=torch.float64))


@pytest.mark.parametrize("potential", ["difference", "max", "sum"])
def test_the_final_correction_makes_the_product_the_tilt(model, potential):
    """Without resampling (a threshold no ESS falls below) the accumulated log-weight of each particle is
    Σ log G = λ r(x0) of the returned sample, whatever the intermediate potentials."""
    fk = FKSteering(reward, 4, LAM, potential, ess_threshold=1e-9, resample_final=False)
    x = _sample(model, 16, fk, steps=10)
    assert torch.allclose(fk.log_weights.flatten(), LAM * reward(x.view(-1, 1)), rtol=1e-12, atol=1e-12)
    assert not any(bool(r.resampled.any()) for r in fk.history)


def test_schedule():
    fk = FKSteering(reward, 2, interval=5)
    assert [k for k in range(23) if fk.is_weighting_step(k, 23, 0.5)] == [4, 9, 14, 19, 22]
    late = FKSteering(reward, 2, interval=1, start=0.3)
    assert not late.is_weighting_step(3, 10, 0.31) and late.is_weighting_step(3, 10, 0.3)
    assert late.is_weighting_step(9, 10, 1.0)  # the last step always weights


def test_seeded_results_do_not_depend_on_the_batch(model):
    k, n = 4, 24
    runs = []
    for batch_size in (None, 8, 12):
        fk = FKSteering(reward, k, LAM, "max", interval=2)
        runs.append((_sample(model, n, fk, steps=10, seeds=range(100, 100 + n), batch_size=batch_size), fk))
    for x, fk in runs[1:]:
        assert torch.equal(x, runs[0][0])
        assert torch.equal(
            torch.cat([r.ancestors for r in fk.history if r.index == 9]), runs[0][1].history[-1].ancestors
        )
    assert any(not torch.equal(r.ancestors, torch.arange(n)) for r in runs[0][1].history)  # it did resample
    with pytest.raises(ValueError, match="multiple of 4"):
        _sample(model, n, FKSteering(reward, k), steps=4, seeds=range(n), batch_size=6)


class NanLate:
    """A reward that returns NaN at its fourth call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return reward(x) + (math.nan if self.calls == 4 else 0.0)


def test_bad_rewards_name_the_step(model):
    with pytest.raises(ValueError, match=r"'NanLate' returned NaN/Inf at step 4 of 6"):
        _sample(model, 8, FKSteering(NanLate(), 4), steps=6)
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(8,\), got \(8, 1\) at step 1"):
        _sample(model, 8, FKSteering(lambda x: reward(x)[:, None], 4), steps=6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_particles=0), "num_particles"),
        (dict(num_particles=2.5), "num_particles"),
        (dict(lam=-1.0), "λ"),
        (dict(lam=math.nan), "λ"),
        (dict(potential="rt"), "unknown potential"),
        (dict(ess_threshold=0.0), "ESS threshold"),
        (dict(ess_threshold=1.5), "ESS threshold"),
        (dict(scheme="sobol"), "unknown resampling scheme"),
        (dict(interval=0), "interval"),
        (dict(start=1.5), "start"),
    ],
)
def test_bad_options(kwargs, match):
    options = dict(reward=reward, num_particles=4) | kwargs
    with pytest.raises(ValueError, match=match):
        FKSteering(**options)


# -- the gradient proposal (Singhal et al. 2025, Sec. 3 "proposal generators") ---------------------------------------

SCALE = 0.5  # the score form's s: below λ = 2, since at high noise E[exp(λ r) | x_t] is flatter than exp(λ r(x̂0))


def ddim_tilted_target(model, steps: int, points: int = 1000, half_width: float = 4.5) -> tuple[torch.Tensor, float]:
    """The exact target of FK steering on DDIM(η = 1) with ``steps`` steps: the discrete sampler's own marginal, tilted
    by exp(λ r). The chain x_{k+1} = c_x x_k + c_0 x̂0(x_k) + c z is propagated on a grid (Chapman–Kolmogorov with
    Gaussian kernels normalised per grid point); its last step is deterministic, x_N = m(x_{N−1}), so the tilted
    expectations are sums over x_{N−1}. (The 30-step ancestral sampler is itself ≈ 0.085 off the continuous tilted
    mixture in the bins, so that one would not test the steering.)"""
    denoiser, process = model
    plan = DDIM(eta=1.0).plan(process, uniform_logsnr(process, steps))
    x = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    s0 = plan.init_noise_sigma
    mass = torch.exp(-(x**2) / (2 * s0 * s0))
    mass = mass / mass.sum()
    for k in range(plan.num_evals):
        c = plan.steps[k]
        x0 = denoiser.predict_x0(x.view(-1, 1), None, float(plan.alpha_t[k]), float(plan.sigma_t[k])).flatten()
        mean = c.x * x + c.history[0] * x0
        if c.noise == 0.0:
            assert k == plan.num_evals - 1
            break
        kernel = torch.exp(-((x[None, :] - mean[:, None]) ** 2) / (2 * c.noise**2))
        mass = (mass[:, None] * kernel / kernel.sum(1, keepdim=True)).sum(0)
    tilted = mass * torch.exp(LAM * reward(mean.view(-1, 1)))
    tilted = tilted / tilted.sum()
    which = torch.bucketize(mean, EDGES)
    return torch.stack([tilted[which == i].sum() for i in range(3)]), float((tilted * mean).sum())


class ProposalOnly(Guidance):
    """The gradient proposal of an FK steering without its weights: the guided sampler alone."""

    def __init__(self, fk: FKSteering) -> None:
        self.fk = fk

    def needs_grad_at(self, ctx):
        return self.fk.needs_grad_at(ctx)

    def guide_x0(self, ctx, x, x0):
        return self.fk.guide_x0(ctx, x, x0)


def _run(model, solver, n: int, guidance=None, steps: int = 30, seed: int = 0, **kwargs) -> torch.Tensor:
    denoiser, process = model
    if "seeds" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return sample(
        denoiser,
        solver,
        uniform_logsnr(process, steps),
        shape=(n, 1),
        dtype=torch.float64,
        progress=False,
        guidance=guidance,
        **kwargs,
    ).flatten()


def _bins(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(torch.bucketize(x, EDGES), minlength=3).double() / x.numel()


@pytest.mark.parametrize("solver", ["ddim-eta1", "sde-dpm++2m"])
def test_gradient_proposal_follows_the_tilted_target(model, solver):
    """128 groups of K = 256 proposed by the score-form gradient sampler (s = 0.5) and weighted by the ratio of the
    transitions: DDIM(η = 1) against its own exact discrete target (grid) within 0.015 (measured ≤ 0.007 at s ∈
    {0, 0.5, 1}, two seeds), SDE-DPM-Solver++(2M) — multistep: the older guided x̂0 enter the base mean — against
    the tilted mixture within the existing tests' 0.03 / 0.035 (measured ≤ 0.013; ignoring the older steps' shifts
    in δ gives 0.06–0.08 in the bins and the mean). The guided sampler without the weights is far off."""
    k, groups = 256, 128
    if solver == "ddim-eta1":
        sampler, tol_bins, tol_mean = DDIM(eta=1.0), 0.015, 0.015
        target_bins, target_mean = ddim_tilted_target(model, 30)
    else:
        sampler, tol_bins, tol_mean = DPMSolverPlusPlus(2, sde=True), 0.03, 0.035
        w, mu, var = tilted_mixture()
        target_bins, target_mean = bin_probabilities(w, mu, var), float((w * mu).sum())
    fk = FKSteering(reward, k, LAM, interval=5, gradient_scale=SCALE)
    x = _run(model, sampler, k * groups, fk)
    bins = _bins(x)
    assert torch.allclose(bins, target_bins, atol=tol_bins), (bins, target_bins)
    assert abs(float(x.mean()) - target_mean) < tol_mean, (float(x.mean()), target_mean)
    assert torch.allclose(fk.rewards, reward(x.view(-1, 1)).double())
    unweighted = _run(model, sampler, 8192, ProposalOnly(FKSteering(reward, k, LAM, gradient_scale=SCALE)))
    assert (_bins(unweighted) - target_bins).abs().max() > 0.1


def test_gradient_proposal_raises_the_ess(model):
    """The guided proposal is closer to the tilted target than the base sampler: at the same K = 64 (128 groups, the
    same noise) the mean ESS before resampling over the weighting steps rises (measured 43.5 → 55.6 of 64)."""
    k, groups = 64, 128
    ess = {}
    for scale in (0.0, SCALE):
        fk = FKSteering(reward, k, LAM, interval=5, gradient_scale=scale)
        _run(model, DPMSolverPlusPlus(1, sde=True), k * groups, fk)
        ess[scale] = float(torch.stack([r.ess.mean() for r in fk.history]).mean())
    assert ess[SCALE] > 1.15 * ess[0.0], ess


@pytest.mark.parametrize("form", ["score", "x0"])
def test_the_weights_are_the_ratio_of_the_transitions(model, form):
    """Recomputed from the path: without resampling and with λ = 0 (no potentials) each particle's log-weight is
    Σ_k log N(x_{k+1}; m_k, c_k²) − log N(x_{k+1}; m'_k, c_k²), with m_k the base mean of the multistep update from the
    unguided x̂0 of this and the older steps, m'_k the guided one; x̂0' = x̂0 + s·(σ²/α or 1)·∇ₓ r(x̂0(x)) at every
    stochastic step, and the last (deterministic) step is the base sampler's map."""
    denoiser, process = model
    solver, steps, n = DPMSolverPlusPlus(2, sde=True), 8, 8
    scale = SCALE if form == "score" else 0.05
    fk = FKSteering(reward, 4, 0.0, ess_threshold=1e-9, resample_final=False, gradient_scale=scale, gradient_form=form)
    seen = []
    out = _run(model, solver, n, fk, steps=steps, seeds=range(n), callback=seen.append).view(-1, 1)
    plan = solver.plan(process, uniform_logsnr(process, steps))
    assert fk.proposal_steps(plan) == list(range(steps - 1))
    xs = [info.x for info in seen] + [out]
    unguided, guided, total = [], [], torch.zeros(n, dtype=torch.float64)
    for k, info in enumerate(seen):
        alpha, sigma = float(plan.alpha_t[k]), float(plan.sigma_t[k])
        x = info.x.detach().requires_grad_(True)
        x0 = denoiser.predict_x0(x, None, alpha, sigma)
        (grad,) = torch.autograd.grad(reward(x0).sum(), x)
        step_scale = (scale * sigma * sigma / alpha if form == "score" else scale) if k < steps - 1 else 0.0
        unguided.append(x0.detach())
        guided.append(x0.detach() + step_scale * grad)
        assert torch.allclose(info.x0, guided[-1], rtol=1e-12, atol=1e-12)
        c = plan.steps[k]
        base = c.x * info.x + sum(h * unguided[-1 - j] for j, h in enumerate(c.history))
        proposal = c.x * info.x + sum(h * guided[-1 - j] for j, h in enumerate(c.history))
        if c.noise == 0.0:
            assert k == steps - 1 and torch.allclose(xs[k + 1], base, rtol=1e-12, atol=1e-12)
            continue
        log_p = torch.distributions.Normal(base, c.noise).log_prob(xs[k + 1]).sum(1)
        log_q = torch.distributions.Normal(proposal, c.noise).log_prob(xs[k + 1]).sum(1)
        total += log_p - log_q
    assert torch.allclose(fk.log_weights.flatten(), total, rtol=1e-9, atol=1e-9)
    assert float(total.abs().max()) > 1e-3  # the proposal did move the particles


def not_differentiable(x: torch.Tensor) -> torch.Tensor:
    return reward(x.detach())


def numpy_reward(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(reward(x).numpy())


def test_gradient_proposal_needs_a_differentiable_reward(model):
    for bad in (not_differentiable, numpy_reward):
        with pytest.raises(ValueError, match=f"reward '{bad.__name__}'"):
            _sample(model, 8, FKSteering(bad, 4, gradient_scale=0.5), steps=6)
        _sample(model, 8, FKSteering(bad, 4, gradient_scale=0.0), steps=6)  # no gradient: any reward


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gradient_scale=-0.5), "gradient_scale"),
        (dict(gradient_scale=math.nan), "gradient_scale"),
        (dict(gradient_scale=math.inf), "gradient_scale"),
        (dict(gradient_scale="big"), "gradient_scale"),
        (dict(gradient_form="eps"), "unknown gradient_form"),
    ],
)
def test_bad_gradient_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FKSteering(reward, 4, **kwargs)


def test_gradient_proposal_does_not_depend_on_the_batch(model):
    k, n = 4, 16
    runs = []
    for batch_size in (None, 8):
        fk = FKSteering(reward, k, LAM, interval=2, gradient_scale=SCALE)
        x = _run(model, DDIM(eta=1.0), n, fk, steps=8, seeds=range(50, 50 + n), batch_size=batch_size)
        runs.append((x, fk))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1].history[-1].ess, torch.cat([r.ess for r in runs[1][1].history if r.index == 7]))


def test_gradient_proposal_refuses_solvers_off_the_grid(model):
    """The exposure-bias time shift moves samples to per-sample levels: its steps are not the plan's Gaussian ones."""
    with pytest.raises(ValueError, match="off the plan's grid"):
        _run(model, ExposureBiasTimeShift(DDIM(eta=1.0)), 8, FKSteering(reward, 4, gradient_scale=SCALE), steps=8)
