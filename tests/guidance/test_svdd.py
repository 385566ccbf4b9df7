"""SVDD (Li et al. 2024) on an exact 1-D Gaussian mixture with the reward r(x) = −(x − c)²/(2 s²), whose soft value
v_t(x_t) = α log E[exp(r(x0)/α) | x_t] is closed form (the posterior of a mixture is a mixture): SVDD with the exact
value against the tilted mixture p(x0)·exp(r(x0)/α) as M grows, SVDD-PM's and SVDD-MC's estimates against the exact
value, the limits (M = 1, constant reward, α → 0), the selection rule, bad input and batch independence."""

from __future__ import annotations

import math

import pytest
import torch

from diffsamplers import DDIM, DPMSolverPlusPlus, sample
from diffsamplers.guidance.svdd import SVDD, select_candidates
from diffsamplers.models.gmm import GaussianMixture, GMMDenoiser, default_process
from diffsamplers.rng import NoiseSource
from diffsamplers.schedules import uniform_logsnr
from diffsamplers.step import SamplingRun, StepContext

pytestmark = pytest.mark.usefixtures("single_thread")

WEIGHTS = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
MEANS = torch.tensor([-1.0, 0.2, 1.2], dtype=torch.float64)
VARIANCES = torch.tensor([0.04, 0.03, 0.05], dtype=torch.float64)
CENTRE, WIDTH2 = 1.0, 0.5  # r(x) = −(x − c)²/(2 s²)
ALPHA = 0.5  # the temperature: target p(x0)·exp(r(x0)/α), λ = 1/α = 2
EDGES = (MEANS[1:] + MEANS[:-1]) / 2  # the bins: one per component
CHI2_2DOF_P001 = 13.816  # the 0.999 quantile of χ²(2)


def reward(x: torch.Tensor) -> torch.Tensor:
    return -((x.flatten(1) - CENTRE) ** 2).sum(1) / (2 * WIDTH2)


def alpha_sigma(sigma_tilde: float) -> tuple[float, float]:
    """VP: x_t = a x0 + s ε with a = 1/√(1 + σ̃²), s = σ̃ a."""
    a = 1.0 / math.sqrt(1.0 + sigma_tilde**2)
    return a, sigma_tilde * a


def posterior(x: torch.Tensor, sigma_tilde: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(x0 | x_t) = Σ_i w_i N(m_i, V_i): log w_i (unnormalised) ∝ log π_i N(x_t; a μ_i, a² v_i + s²),
    m_i = μ_i + a v_i (x_t − a μ_i)/(a² v_i + s²), V_i = v_i s²/(a² v_i + s²); each ``(B, 3)``."""
    a, s = alpha_sigma(sigma_tilde)
    x = x.flatten(1)[:, :1].to(torch.float64)
    var_t = a * a * VARIANCES + s * s
    log_w = torch.log(WEIGHTS) - 0.5 * torch.log(2 * math.pi * var_t) - (x - a * MEANS) ** 2 / (2 * var_t)
    log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)
    return log_w, MEANS + a * VARIANCES * (x - a * MEANS) / var_t, VARIANCES * s * s / var_t


def soft_value(x: torch.Tensor, sigma_tilde: float, alpha: float = ALPHA) -> torch.Tensor:
    """v_t(x_t) = α log Σ_i w_i ∫ N(x0; m_i, V_i) exp(r(x0)/α) dx0, the Gaussian integral being
    √(s²α/(V_i + s²α)) exp(−(c − m_i)²/(2 (V_i + s²α))) (exp(r/α) ∝ N(x0; c, s²α))."""
    log_w, m, var = posterior(x, sigma_tilde)
    total = var + WIDTH2 * alpha
    log_e = 0.5 * torch.log(WIDTH2 * alpha / total) - (CENTRE - m) ** 2 / (2 * total)
    return alpha * torch.logsumexp(log_w + log_e, dim=1)


def expected_reward(x: torch.Tensor, sigma_tilde: float) -> torch.Tensor:
    """E[r(x0) | x_t] = −Σ_i w_i ((m_i − c)² + V_i)/(2 s²): the soft value's α → ∞ limit, MC's target at α = 0."""
    log_w, m, var = posterior(x, sigma_tilde)
    return -(log_w.exp() * ((m - CENTRE) ** 2 + var)).sum(1) / (2 * WIDTH2)


def tilted_mixture(lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(x)·exp(λ r(x)) for p = Σ w_i N(μ_i, v_i) by the Gaussian product rule (as in test_fk_steering.py)."""
    v = WIDTH2 / lam
    w = WEIGHTS * torch.exp(-((CENTRE - MEANS) ** 2) / (2 * (VARIANCES + v))) / torch.sqrt(VARIANCES + v)
    var = 1 / (1 / VARIANCES + 1 / v)
    return w / w.sum(), var * (MEANS / VARIANCES + CENTRE / v), var


def bin_probabilities(w: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    cdf = torch.stack([(w * 0.5 * torch.erfc(-(e - mu) / torch.sqrt(2 * var))).sum() for e in EDGES])
    return torch.cat([cdf[:1], cdf[1:] - cdf[:-1], 1 - cdf[-1:]])


def bins_of(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(torch.bucketize(x, EDGES), minlength=3).double() / x.numel()


def chi_square(x: torch.Tensor, probs: torch.Tensor) -> float:
    return float(((bins_of(x) - probs) ** 2 / probs).sum() * x.numel())


@pytest.fixture(scope="module")
def model():
    gmm = GaussianMixture.from_covariances(MEANS.view(3, 1).numpy(), VARIANCES.view(3, 1, 1).numpy(), WEIGHTS.numpy())
    process = default_process()
    return gmm, gmm.as_denoiser(process), process


def _sample(model, n: int, guidance=None, steps: int = 50, solver=None, seed: int = 0, **kwargs) -> torch.Tensor:
    _, denoiser, process = model
    if "seeds" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return sample(
        denoiser,
        solver or DPMSolverPlusPlus(2, sde=True),
        uniform_logsnr(process, steps),
        shape=(n, 1),
        dtype=torch.float64,
        progress=False,
        guidance=guidance,
        **kwargs,
    ).flatten()


def _context(model, steps: int, index: int, batch: int) -> StepContext:
    """A step context at evaluation ``index`` of an SDE-DPM-Solver++ run of ``batch`` seeded samples."""
    _, denoiser, process = model
    solver = DPMSolverPlusPlus(2, sde=True)
    plan = solver.plan(process, uniform_logsnr(process, steps))
    x = torch.zeros(batch, 1, dtype=torch.float64)
    run = SamplingRun.start(solver, plan, x, denoiser=denoiser, noise=NoiseSource(seeds=range(batch)))
    return StepContext(index, run, None, float(plan.alpha_t[index]), float(plan.sigma_t[index]))


def _noisy(model, n: int, sigma_tilde: float, seed: int = 0) -> torch.Tensor:
    """n draws of x_t at level σ̃ (x0 from the mixture)."""
    gmm = model[0]
    gen = torch.Generator().manual_seed(seed)
    a, s = alpha_sigma(sigma_tilde)
    x0 = gmm.sample(n, generator=gen, dtype=torch.float64)
    return a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)


def test_the_closed_form_soft_value(model):
    """The posterior mean of the closed form is the model's own denoiser (the same VP coefficients), and the soft value
    matches Monte Carlo by Bayes' rule: 10⁶ prior draws x0 weighted by N(x_t; a x0, s²) (measured error ≤ 8·10⁻⁴)."""
    gmm, denoiser, process = model
    x0 = gmm.sample(1_000_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64).flatten()
    for sigma_tilde, xt in ((2.0, 0.3), (0.5, 0.5), (0.1, -0.9)):
        a, s = alpha_sigma(sigma_tilde)
        alpha_p, sigma_p = (float(v) for v in process.alpha_sigma(sigma_tilde))
        assert math.isclose(a, alpha_p, rel_tol=1e-12) and math.isclose(s, sigma_p, rel_tol=1e-12)
        x = torch.tensor([[xt]], dtype=torch.float64)
        log_w, m, _ = posterior(x, sigma_tilde)
        t = float(process.timestep_from_sigma_tilde(sigma_tilde))
        assert torch.allclose((log_w.exp() * m).sum(1), denoiser.predict_x0(x, t, a, s).flatten(), atol=1e-10)
        log_lik = -((xt - a * x0) ** 2) / (2 * s * s)
        r = reward(x0.view(-1, 1))
        mc = ALPHA * (torch.logsumexp(log_lik + r / ALPHA, 0) - torch.logsumexp(log_lik, 0))
        assert abs(float(mc) - float(soft_value(x, sigma_tilde))) < 3e-3, (sigma_tilde, float(mc))
        mean_r = float((torch.softmax(log_lik, 0) * r).sum())
        assert abs(mean_r - float(expected_reward(x, sigma_tilde))) < 3e-3


def test_the_exact_value_approaches_the_tilted_mixture(model):
    """SVDD with the exact soft value at α = 0.5 (100 steps of SDE-DPM-Solver++(2M), 4000 samples) against
    p(x0)·exp(r(x0)/α): M = 1 is the base sampler bit for bit (χ² against the untilted mixture); the distance to the
    target (largest bin error, mean error) falls with M ∈ {1, 4, 32}: measured 0.61/1.15, 0.14/0.21, 0.041/0.048.

    Tolerance at M = 32: bins within 0.07 and the mean within 0.08 of the target (vs 0.61 and 1.15 unguided; measured
    0.025–0.050 and 0.024–0.059 over seeds 0–3). The remaining gap is the bias of self-normalised importance sampling
    with M proposals per step, which shrinks with M and with the step size (measured mean error 0.029 at M = 64, 0.027
    at M = 32 on 200 steps)."""
    n = 4000
    w, mu, var = tilted_mixture(1 / ALPHA)
    target_bins, target_mean = bin_probabilities(w, mu, var), float((w * mu).sum())
    base_bins = bin_probabilities(WEIGHTS, MEANS, VARIANCES)
    distances = []
    for m in (1, 4, 32):
        svdd = SVDD(reward, m, alpha=ALPHA, value=soft_value)
        x = _sample(model, n, svdd, steps=100)
        bin_error = float((bins_of(x) - target_bins).abs().max())
        mean_error = abs(float(x.mean()) - target_mean)
        distances.append((bin_error, mean_error))
        print(f"M={m}: bins {bins_of(x).tolist()}, mean {float(x.mean()):.4f}, errors {bin_error:.4f}/{mean_error:.4f}")
        if m == 1:
            assert torch.equal(x, _sample(model, n, steps=100))
            assert chi_square(x, base_bins) < CHI2_2DOF_P001
            assert svdd.values is None and svdd.history == []
    print(f"target bins {target_bins.tolist()}, mean {target_mean:.4f}")
    for (b0, m0), (b1, m1) in zip(distances, distances[1:], strict=False):
        assert b1 < b0 and m1 < m0, distances
    assert distances[-1][0] < 0.07 and distances[-1][1] < 0.08, distances
    assert distances[0][0] > 0.4 and distances[0][1] > 1.0


def test_pm_value_against_the_exact_soft_value(model):
    """SVDD-PM's r(x̂0(x_t)) (the library's estimator on 2000 draws of x_t) against v_t(x_t) at α = 0.5: the mean gap
    shrinks as σ̃ → 0 (measured 1.16, 0.62, 0.056, 0.0066, 0.0014 at σ̃ = 2.7, 0.39, 0.084, 0.026, 0.012), since the
    posterior collapses onto x̂0; r(x̂0) stays closer to E[r | x_t] (Jensen gap Var(x0 | x_t)/(2 s²))."""
    steps, n = 50, 2000
    svdd = SVDD(reward, 1, alpha=ALPHA, value="pm")
    gaps = []
    for k in (20, 30, 38, 44, 48):
        ctx = _context(model, steps, k, n)
        sigma_tilde = float(ctx.plan.sigmas[k + 1])
        x = _noisy(model, n, sigma_tilde, seed=k)
        pm = svdd.candidate_values(ctx, x)
        _, denoiser, process = model
        a, s = alpha_sigma(sigma_tilde)
        assert torch.allclose(pm, reward(denoiser.predict_x0(x, float(ctx.plan.timesteps[k + 1]), a, s)))
        gap = float((pm - soft_value(x, sigma_tilde)).abs().mean())
        gaps.append(gap)
        print(f"sigma~={sigma_tilde:.4f}: mean |r(x0_hat) - v_t| = {gap:.5f}")
    assert all(g1 < g0 for g0, g1 in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 0.005 and gaps[0] > 0.5


def test_pm_mean_reward_rises_with_the_candidates(model):
    """SVDD-PM with argmax (α = 0, the official setting) on 512 samples: the mean final reward rises with M; with DDIM
    (η = 1) the last selection's value is the returned sample's reward (its final step returns x̂0)."""
    n = 512
    means = []
    for m in (1, 4, 16):
        svdd = SVDD(reward, m, value="pm")
        x = _sample(model, n, svdd, steps=30, solver=DDIM(eta=1.0), seed=1)
        means.append(float(reward(x.view(-1, 1)).mean()))
        if m > 1:
            assert svdd.value_steps == list(range(29))  # every step but the deterministic last one
            assert svdd.values.shape == (29, n)
            assert torch.allclose(svdd.values[-1], reward(x.view(-1, 1)), atol=1e-12)
    print("mean reward for M = 1, 4, 16:", means)
    assert means[0] < means[1] < means[2], means
    assert means[2] > -0.2 > -1.0 > means[0]


def test_mc_rollouts(model):
    """SVDD-MC: the rollout estimate against the exact value at σ̃ ≈ 0.15 (64 points, 256 rollouts each): at α = 0 the
    mean reward E[r | x_t], unbiased (measured mean difference 0.0006, SD 0.027); at α = 0.5 the soft value, biased low
    by Jensen's inequality (−0.002). With M = 8 (4 rollouts of 5 steps each) the mean final reward beats the base
    sampler's."""
    steps, k, n = 50, 35, 64
    ctx = _context(model, steps, k, n)
    sigma_tilde = float(ctx.plan.sigmas[k + 1])
    x = _noisy(model, n, sigma_tilde, seed=k)
    for alpha, exact in ((0.0, expected_reward(x, sigma_tilde)), (ALPHA, soft_value(x, sigma_tilde))):
        mc = SVDD(reward, 1, alpha=alpha, value="mc", rollouts=256).candidate_values(ctx, x)
        diff = mc - exact
        print(f"alpha={alpha}: MC - exact mean {float(diff.mean()):.5f}, SD {float(diff.std()):.5f}")
        assert abs(float(diff.mean())) < 0.012 and float(diff.abs().mean()) < 0.04
    assert SVDD(reward, 2, value="mc", rollout_steps=5).rollout_levels(50, 36).tolist() == [36, 39, 42, 44, 47, 50]
    assert SVDD(reward, 2, value="mc").rollout_levels(50, 47).tolist() == [47, 48, 49, 50]

    n = 128
    base = float(reward(_sample(model, n, steps=20, seed=2).view(-1, 1)).mean())
    svdd = SVDD(reward, 8, value="mc", rollouts=4, rollout_steps=5)
    guided = float(reward(_sample(model, n, svdd, steps=20, seed=2).view(-1, 1)).mean())
    print(f"mean reward: base {base:.4f}, SVDD-MC (M = 8) {guided:.4f}")
    assert guided > base + 1.0


def constant(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), 0.7, dtype=x.dtype)


def test_a_constant_reward_changes_nothing(model):
    """With a constant reward and α > 0 the pick is uniform over the candidates (χ² over all 49 selections of 2000
    samples) and the samples follow the untilted mixture (χ² on the component bins)."""
    n, m = 2000, 4
    svdd = SVDD(constant, m, alpha=1.0, value="pm")
    x = _sample(model, n, svdd, steps=50, seed=3)
    assert chi_square(x, bin_probabilities(WEIGHTS, MEANS, VARIANCES)) < CHI2_2DOF_P001
    chosen = torch.cat([r.chosen for r in svdd.history])
    assert len(svdd.history) == 49 and chosen.numel() == 49 * n
    counts = torch.bincount(chosen, minlength=m).double()
    expected = chosen.numel() / m
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.27  # the 0.999 quantile of χ²(3)
    assert torch.equal(svdd.values, torch.full((49, n), 0.7, dtype=torch.float64))


def test_alpha_to_zero_is_the_argmax(model):
    """A tiny temperature picks what argmax picks: the same samples as α = 0 (the selection's uniforms come from their
    own stream and never shift the solver's noise) and the same choices."""
    runs = []
    for alpha in (0.0, 1e-9):
        svdd = SVDD(reward, 4, alpha=alpha, value="pm")
        runs.append((_sample(model, 16, svdd, steps=12, seeds=range(16)), svdd))
    (x0, g0), (x1, g1) = runs
    assert torch.equal(x0, x1)
    for r0, r1 in zip(g0.history, g1.history, strict=True):
        assert torch.equal(r0.chosen, r1.chosen)
        assert torch.equal(r0.chosen, torch.argmax(r0.values, dim=1))
    hot = SVDD(reward, 4, alpha=50.0, value="pm")  # a high temperature picks other than the argmax somewhere
    _sample(model, 16, hot, steps=12, seeds=range(16))
    assert any(not torch.equal(r.chosen, torch.argmax(r.values, dim=1)) for r in hot.history)


def test_select_candidates():
    values = torch.tensor([[0.0, 2.0, 1.0, 2.0], [-1.0, -3.0, -2.0, -0.5]], dtype=torch.float64)
    assert select_candidates(values, 0.0).tolist() == [1, 3]  # the first of a tie
    u = torch.tensor([0.3, 0.9], dtype=torch.float64)
    assert torch.equal(select_candidates(values, 1e-6, u), select_candidates(values, 0.0))
    # inverse CDF: on an even grid of uniforms the frequencies are the softmax probabilities up to 1/n
    n, alpha = 10_000, 0.7
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for row in values:
        chosen = select_candidates(row.expand(n, 4), alpha, grid)
        freq = torch.bincount(chosen, minlength=4).double() / n
        assert torch.allclose(freq, torch.softmax(row / alpha, 0), atol=1.5 / n)
    flat = select_candidates(torch.zeros(n, 5, dtype=torch.float64), 2.0, grid)
    assert torch.equal(torch.bincount(flat, minlength=5), torch.full((5,), n // 5))
    edges = select_candidates(values, 1.0, torch.tensor([0.0, 1.0 - 2.0**-53], dtype=torch.float64))
    assert edges.tolist() == [0, 3]
    one = select_candidates(values[:, :1], 1.0, u)
    assert one.tolist() == [0, 0]
    with pytest.raises(ValueError, match="one uniform per sample"):
        select_candidates(values, 1.0)
    with pytest.raises(ValueError, match="one uniform per sample"):
        select_candidates(values, 1.0, u[:1])
    with pytest.raises(ValueError, match=r"shape \(B, M\)"):
        select_candidates(values[0], 0.0)
    for alpha in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature α"):
            select_candidates(values, alpha, u)


class NanLate:
    """A reward that returns NaN at its fourth call (the fourth step: PM calls the reward once per step)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return reward(x) + (math.nan if self.calls == 4 else 0.0)


def test_bad_rewards_and_values_name_the_step(model):
    with pytest.raises(ValueError, match=r"the reward 'NanLate' returned NaN/Inf at step 4 of 6 .*x̂0.* rows \[0, 1"):
        _sample(model, 4, SVDD(NanLate(), 3), steps=6)
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(12,\), got \(12, 1\) at step 1 of 6"):
        _sample(model, 4, SVDD(lambda x: reward(x)[:, None], 3), steps=6)

    def nan_value(x, sigma_tilde):  # NaN for candidate 1 of sample 1 (row 1·3 + 1)
        v = soft_value(x, sigma_tilde)
        v[4] = math.nan
        return v

    with pytest.raises(
        ValueError, match=r"the value 'nan_value' returned NaN/Inf at step 1 of 6 .* sample rows \[1\]$"
    ):
        _sample(model, 4, SVDD(reward, 3, value=nan_value), steps=6)

    def soft_value_flat(x, sigma_tilde):
        return soft_value(x, sigma_tilde)[:-1]

    with pytest.raises(ValueError, match=r"'soft_value_flat' must return a tensor of shape \(12,\), got \(11,\)"):
        _sample(model, 4, SVDD(reward, 3, value=soft_value_flat), steps=6)
    with pytest.raises(ValueError, match=r"NaN/Inf at step 2 of 6 .*rollouts' final samples"):
        calls = []

        def nan_mc(x):
            calls.append(1)
            return reward(x) + (math.nan if len(calls) == 2 else 0.0)

        _sample(model, 4, SVDD(nan_mc, 2, value="mc", rollouts=2, rollout_steps=2), steps=6)


def test_a_deterministic_sampler_is_refused(model):
    with pytest.raises(ValueError, match=r"stochastic sampler.*ddim takes no random step"):
        _sample(model, 4, SVDD(reward, 3), steps=6, solver=DDIM(eta=0.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_candidates=0), "num_candidates"),
        (dict(num_candidates=2.5), "num_candidates"),
        (dict(alpha=-1.0), "temperature α"),
        (dict(alpha=math.nan), "temperature α"),
        (dict(alpha=math.inf), "temperature α"),
        (dict(value="tweedie"), "unknown value estimator"),
        (dict(value=3), "value must be"),
        (dict(rollouts=0), "rollouts"),
        (dict(rollout_steps=0), "rollout_steps"),
    ],
)
def test_bad_options(kwargs, match):
    options = dict(reward=reward, num_candidates=4) | kwargs
    with pytest.raises(ValueError, match=match):
        SVDD(**options)


def test_a_reward_must_be_callable():
    with pytest.raises(TypeError, match="reward must be callable"):
        SVDD(1.0, 4)


@pytest.mark.parametrize(
    "options", [dict(alpha=0.5, value="pm"), dict(alpha=0.5, value="mc", rollouts=3, rollout_steps=3)], ids=["pm", "mc"]
)
def test_seeded_results_do_not_depend_on_the_batch(model, options):
    n = 12
    runs = []
    for batch_size in (None, 4, 6):
        svdd = SVDD(reward, 3, **options)
        runs.append((_sample(model, n, svdd, steps=8, seeds=range(50, 50 + n), batch_size=batch_size), svdd))
    (x, svdd), others = runs[0], runs[1:]
    for y, other in others:
        assert torch.equal(y, x)
        assert torch.equal(other.values, svdd.values)
    assert len(svdd.history) == 7 and len(others[0][1].history) == 21  # 7 selecting steps, 3 chunks
    assert any(bool((r.chosen != 0).any()) for r in svdd.history)


class Shifted(GMMDenoiser):
    """The mixture shifted by a per-sample condition y: D(x | y) = D(x − α y) + y (exact), checking that the candidates'
    model call receives their own sample's condition."""

    def predict_x0(self, x, timestep, alpha, sigma, cond=None, uncond=None, guidance_scale=None):
        y = cond["y"].view(-1, 1).to(x.dtype)
        assert y.shape[0] == x.shape[0]
        return self.gmm.denoise(x - alpha * y, alpha, sigma) + y


def test_candidates_keep_their_conditions(model):
    gmm, _, process = model
    y = torch.tensor([0.0, 3.0, -3.0, 6.0] * 2, dtype=torch.float64)
    svdd = SVDD(reward, 3, value="pm")
    x = sample(
        Shifted(gmm, process),
        DDIM(eta=1.0),
        uniform_logsnr(process, 10),
        shape=(8, 1),
        cond={"y": y},
        dtype=torch.float64,
        progress=False,
        guidance=svdd,
        seeds=range(8),
        batch_size=4,
    )
    assert torch.allclose(svdd.values[-1], reward(x), atol=1e-12)  # the final step returns x̂0 given y
    assert bool(((x.flatten() - y).abs() < 2.0).all())


def test_value_calls_in_chunks_give_the_same_samples(model):
    """value_chunk only splits SVDD-PM's model call: the same candidates, values and choices, bit for bit."""
    runs = []
    for chunk in (None, 3, 4):
        guidance = SVDD(reward, 4, value_chunk=chunk)
        x = _sample(model, 6, guidance, steps=8, seeds=list(range(6)))
        runs.append((x, guidance.values))
    for x, values in runs[1:]:
        assert torch.equal(x, runs[0][0]) and torch.equal(values, runs[0][1])
    with pytest.raises(ValueError, match="value_chunk must be an integer ≥ 1, got 0"):
        SVDD(reward, 4, value_chunk=0)
