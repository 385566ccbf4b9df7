"""Feynman–Kac correctors (Skreta et al. 2025) on exact 1-D Gaussian mixtures with closed-form denoisers: annealing
q^β, a product of two experts and CFG as a geometric average against their targets (numerical integration on a fine
grid, or the closed-form product mixture), the unweighted target-score sampler missing them, the weight increments
against the special-case formulas from the exact scores, and bad input.

Statistics: every group of K particles is resampled at the end, so its particles are dependent; the chi-square test
takes one particle per group (a uniformly random one: an exact draw from the group's weighted population), the
moments use every particle with the standard error of the group means."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2

from diffsamplers import DPMSolverPlusPlus, EulerMaruyama, sample
from diffsamplers.guidance.fk_correctors import Expert, FeynmanKacCorrector
from diffsamplers.models.conditional_gmm import ClassConditionalMixture
from diffsamplers.models.gmm import GaussianMixture, default_process
from diffsamplers.rng import NoiseSource
from diffsamplers.schedules import uniform_logsnr
from diffsamplers.step import SamplingRun, StepContext, StepInfo, step

pytestmark = pytest.mark.usefixtures("single_thread")

GRID = torch.linspace(-5.0, 5.0, 100_001, dtype=torch.float64)
STEPS, K, GROUPS = 100, 64, 512


def mixture_1d(means, variances, weights) -> GaussianMixture:
    m = torch.tensor(means, dtype=torch.float64)
    v = torch.tensor(variances, dtype=torch.float64)
    return GaussianMixture.from_covariances(m.view(-1, 1).numpy(), v.view(-1, 1, 1).numpy(), weights)


def density(gmm: GaussianMixture, x: torch.Tensor = GRID) -> torch.Tensor:
    v = gmm.eigvals.flatten()
    return (
        gmm.weights * torch.exp(-((x[:, None] - gmm.means.flatten()) ** 2) / (2 * v)) / torch.sqrt(2 * math.pi * v)
    ).sum(1)


def quantile_edges(values: torch.Tensor, qs=(0.25, 0.5, 0.75)) -> torch.Tensor:
    """Bin edges at quantiles of the density ``values`` on :data:`GRID` (bins of equal probability)."""
    cdf = torch.cumsum(values / values.sum(), 0)
    return GRID[torch.searchsorted(cdf, torch.tensor(qs, dtype=torch.float64))]


class Target:
    """A 1-D density on :data:`GRID` (unnormalised values): its bin probabilities, mean and variance."""

    def __init__(self, values: torch.Tensor, edges: torch.Tensor):
        self.p = values / values.sum()
        self.edges = edges
        self.mean = float((self.p * GRID).sum())
        self.var = float((self.p * (GRID - self.mean) ** 2).sum())
        self.bins = torch.bincount(torch.bucketize(GRID, edges), weights=self.p, minlength=len(edges) + 1)

    def chi_square(self, x: torch.Tensor) -> float:
        """The p-value of the chi-square test of independent draws ``x`` against the bins."""
        counts = torch.bincount(torch.bucketize(x, self.edges), minlength=len(self.edges) + 1).double()
        expected = self.bins * x.numel()
        return float(chi2.sf(float(((counts - expected) ** 2 / expected).sum()), len(self.edges)))

    def check(self, x: torch.Tensor, k: int, tol_mean: float, tol_var: float) -> dict[str, float]:
        """Chi-square on one random particle per group, mean and variance of all particles; returns the numbers."""
        groups = x.numel() // k
        pick = torch.randint(k, (groups,), generator=torch.Generator().manual_seed(1))
        draws = x.view(groups, k)[torch.arange(groups), pick]
        out = {
            "p": self.chi_square(draws),
            "mean": float(x.mean()) - self.mean,
            "var": float(x.var()) - self.var,
            "se_mean": float(x.view(groups, k).mean(1).std()) / math.sqrt(groups),
        }
        assert out["p"] > 1e-3, out
        assert abs(out["mean"]) < tol_mean and abs(out["var"]) < tol_var, out
        return out


def run(denoiser, fk, n, steps=STEPS, solver=None, seed=0, **kwargs) -> torch.Tensor:
    if "seeds" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return sample(
        denoiser,
        solver or EulerMaruyama(),
        uniform_logsnr(denoiser.process, steps),
        shape=(n, 1),
        dtype=torch.float64,
        progress=False,
        guidance=fk,
        **kwargs,
    ).flatten()


# -- 1. annealing -------------------------------------------------------------------------------------
ANNEAL = mixture_1d([-1.0, 0.2, 1.2], [0.04, 0.03, 0.05], [0.45, 0.35, 0.2])


@pytest.fixture(scope="module")
def anneal_model():
    return ANNEAL.as_denoiser(default_process())


@pytest.mark.parametrize(("beta", "tol_var"), [(2.0, 0.03), (0.5, 0.05)])
def test_annealing_follows_q_to_the_beta(anneal_model, beta, tol_var):
    """q_0^β by numerical integration; bins one per component. FKC (K = 64, 512 groups, 100 Euler–Maruyama steps)
    passes the chi-square test and its mean is within 0.03 (≈ 3 standard errors of the group means, 0.006–0.011),
    its variance within 0.03 (β = 2; measured |Δ| ≤ 0.007 over four seeds) or 0.05 (β = 0.5: the start from
    N(0, I) instead of q_T^β leaves +0.02–0.037 over four seeds, 3–6 standard errors, not reduced by K = 256 or 200
    steps); the same target-score sampler without weights (K = 1) fails the chi-square test on 4096 samples."""
    edges = (ANNEAL.means.flatten()[1:] + ANNEAL.means.flatten()[:-1]) / 2
    target = Target(density(ANNEAL) ** beta, edges)
    fk = FeynmanKacCorrector.annealing(beta, K)
    x = run(anneal_model, fk, K * GROUPS)
    target.check(x, K, 0.03, tol_var)
    assert fk.history[-1].index == STEPS - 1 and len(fk.history) == STEPS
    unweighted = run(anneal_model, FeynmanKacCorrector.annealing(beta, 1), 4096, seed=1)
    assert target.chi_square(unweighted) < 1e-6


# -- 2. product of experts -------------------------------------------------------------------------------
EXPERTS = ClassConditionalMixture(
    [mixture_1d([-0.8, 0.4], [0.09, 0.06], [0.5, 0.5]), mixture_1d([-0.4, 0.8], [0.08, 0.1], [0.3, 0.7])]
)
LABELS = ({"class_labels": torch.tensor([0])}, {"class_labels": torch.tensor([1])})


def product_mixture(a: GaussianMixture, b: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N(μ_i, v_i)·N(μ_j, v_j) = N(μ_i; μ_j, v_i + v_j)·N(m_ij, v_ij), v_ij = 1/(1/v_i + 1/v_j),
    m_ij = v_ij (μ_i/v_i + μ_j/v_j): the product of two mixtures is the mixture of the pairs."""
    mi, vi, wi = a.means.flatten()[:, None], a.eigvals.flatten()[:, None], a.weights[:, None]
    mj, vj, wj = b.means.flatten()[None], b.eigvals.flatten()[None], b.weights[None]
    w = wi * wj * torch.exp(-((mi - mj) ** 2) / (2 * (vi + vj))) / torch.sqrt(vi + vj)
    var = 1 / (1 / vi + 1 / vj)
    return (w / w.sum()).flatten(), (var * (mi / vi + mj / vj)).flatten(), var.flatten()


def test_product_of_two_experts():
    """q(x|0)·q(x|1) in closed form (4 quantile bins); its mean and variance also by integration of the product
    of densities. FKC passes; the unweighted sampler with the summed scores fails."""
    process = default_process()
    denoiser = EXPERTS.as_denoiser(process)
    w, mu, var = product_mixture(*EXPERTS.classes)
    closed = mixture_1d(mu.tolist(), var.tolist(), w.numpy())
    values = density(closed)
    numeric = density(EXPERTS.classes[0]) * density(EXPERTS.classes[1])
    assert torch.allclose(values / values.sum(), numeric / numeric.sum(), atol=1e-12)
    target = Target(values, quantile_edges(values))
    assert abs(target.mean - float((w * mu).sum())) < 1e-9
    fk = FeynmanKacCorrector.product(LABELS, K)
    x = run(denoiser, fk, K * GROUPS)
    target.check(x, K, 0.03, 0.03)
    unweighted = run(denoiser, FeynmanKacCorrector.product(LABELS, 1), 4096, seed=1)
    assert target.chi_square(unweighted) < 1e-6


# -- 3. classifier-free guidance as a geometric average --------------------------------------------------------
CLASSES = ClassConditionalMixture(
    [mixture_1d([-0.6, 0.5], [0.05, 0.05], [0.5, 0.5]), mixture_1d([0.0, 1.0], [0.05, 0.05], [0.5, 0.5])]
)
W_CFG = 3.0


def test_cfg_as_a_geometric_average():
    """q(x)^{1−w} q(x|0)^w with w = 3 by integration (4 quantile bins). FKC passes; plain CFG (the same drift
    without weights) fails — and FKC with K = 1 is plain CFG, to rounding."""
    process = default_process()
    denoiser = CLASSES.as_denoiser(process)
    values = density(CLASSES.pooled) ** (1 - W_CFG) * density(CLASSES.classes[0]) ** W_CFG
    target = Target(values, quantile_edges(values))
    n = K * GROUPS
    conds = dict(cond={"class_labels": torch.zeros(n, dtype=torch.long)}, uncond={"class_labels": torch.tensor([2])})
    fk = FeynmanKacCorrector.classifier_free(W_CFG, K)
    x = run(denoiser, fk, n, **conds)
    target.check(x, K, 0.03, 0.03)
    m = 4096
    plain_conds = dict(cond={"class_labels": torch.zeros(m, dtype=torch.long)}, uncond=conds["uncond"])
    plain = run(denoiser, None, m, seed=1, guidance_scale=W_CFG, **plain_conds)
    assert target.chi_square(plain) < 1e-6
    single = run(denoiser, FeynmanKacCorrector.classifier_free(W_CFG, 1), m, seed=1, **plain_conds)
    assert torch.allclose(single, plain, rtol=0, atol=1e-9)


# -- 4. the weight increments -----------------------------------------------------------------------------------
MIX2D = ClassConditionalMixture.random(num_classes=2, components_per_class=2, sample_shape=(2,), seed=3)


class Counting:
    """The exact class-conditional denoiser, counting its calls and the rows they evaluate."""

    def __init__(self, process):
        self.inner = MIX2D.as_denoiser(process)
        self.process = process
        self.calls: list[int] = []

    def predict_x0(self, x, timestep, alpha, sigma, cond=None, uncond=None, guidance_scale=None):
        self.calls.append(x.shape[0])
        return self.inner.predict_x0(x, timestep, alpha, sigma, cond, uncond, guidance_scale)


def exact_score(y: torch.Tensor, sigma_tilde: float, label: int) -> torch.Tensor:
    """∇ log q(y | c) at level σ̃ in y = x/α, from the denoiser in the VE form D(y; α = 1, σ = σ̃)."""
    return (MIX2D.denoise(y, 1.0, sigma_tilde, torch.tensor([label])) - y) / sigma_tilde**2


def one_step(fk, index: int, n: int = 8, **conds) -> tuple[torch.Tensor, torch.Tensor, Counting, SamplingRun]:
    """Evaluation ``index`` of a 50-step plan from x of ~ the marginal's scale; returns (x, x̂0 the solver got)."""
    process = default_process()
    denoiser = Counting(process)
    plan = EulerMaruyama().plan(process, uniform_logsnr(process, 50))
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    seen: list[StepInfo] = []
    run_ = SamplingRun.start(
        EulerMaruyama(), plan, x, denoiser=denoiser, guidance=fk, noise=NoiseSource(seeds=range(n)),
        callback=seen.append, **conds,
    )  # fmt: skip
    step(run_, index, x)
    return x, seen[0].x0, denoiser, run_


NEVER = dict(ess_threshold=1e-12, resample_final=False)  # weights kept: the log-weight is the increment


@pytest.mark.parametrize("index", [10, 30, 49])
def test_increments_match_the_special_cases(index):
    """Δw from one step against β(β−1)/2‖s‖²Δσ̃² (annealing), ⟨s_1, s_2⟩Δσ̃² (product) and w(w−1)/2‖s_c − s_u‖²Δσ̃²
    (CFG), with the exact scores in y = x/α; x̂0' = Σβ x̂0_i + (1 − Σβ) x/α; one model call per distinct condition."""
    process = default_process()
    plan = EulerMaruyama().plan(process, uniform_logsnr(process, 50))
    s_k, s_next = float(plan.sigmas[index]), float(plan.sigmas[index + 1])
    alpha = float(plan.alpha_t[index])
    d_sigma2 = s_k**2 - s_next**2
    labels = {"class_labels": torch.zeros(8, dtype=torch.long)}
    null = {"class_labels": torch.tensor([2])}

    fk = FeynmanKacCorrector.annealing(2.5, 4, **NEVER)
    x, x0, counting, _ = one_step(fk, index, cond=labels)
    y = x / alpha
    s = exact_score(y, s_k, 0)
    expected = 2.5 * 1.5 / 2 * (s * s).sum(1) * d_sigma2
    assert torch.allclose(fk.log_weights.flatten(), expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(x0, y + s_k**2 * 2.5 * s, rtol=1e-9, atol=1e-9)
    assert counting.calls == [8]

    fk = FeynmanKacCorrector.product(LABELS, 4, **NEVER)
    x, x0, counting, _ = one_step(fk, index)
    y = x / alpha
    s0, s1 = exact_score(y, s_k, 0), exact_score(y, s_k, 1)
    assert torch.allclose(fk.log_weights.flatten(), (s0 * s1).sum(1) * d_sigma2, rtol=1e-9, atol=1e-12)
    assert torch.allclose(x0, y + s_k**2 * (s0 + s1), rtol=1e-9, atol=1e-9)
    assert counting.calls == [8, 8]

    fk = FeynmanKacCorrector.classifier_free(W_CFG, 4, **NEVER)
    x, x0, counting, _ = one_step(fk, index, cond=labels, uncond=null)
    y = x / alpha
    sc, su = exact_score(y, s_k, 0), exact_score(y, s_k, 2)
    expected = W_CFG * (W_CFG - 1) / 2 * ((sc - su) ** 2).sum(1) * d_sigma2
    assert torch.allclose(fk.log_weights.flatten(), expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(x0, y + s_k**2 * (W_CFG * sc + (1 - W_CFG) * su), rtol=1e-9, atol=1e-9)
    assert counting.calls == [8, 8]

    # The general rule with three experts; the two extra conditions stack into one call of 2B rows.
    betas = (0.7, -0.4, 1.2)
    experts = [Expert(betas[0], "cond"), Expert(betas[1], "uncond"), Expert(betas[2], LABELS[1])]
    fk = FeynmanKacCorrector(experts, 4, **NEVER)
    x, x0, counting, _ = one_step(fk, index, cond=labels, uncond=null)
    y = x / alpha
    scores = [exact_score(y, s_k, c) for c in (0, 2, 1)]
    total = sum(b * sc for b, sc in zip(betas, scores))
    expected = 0.5 * ((total**2).sum(1) - sum(b * (sc**2).sum(1) for b, sc in zip(betas, scores))) * d_sigma2
    assert torch.allclose(fk.log_weights.flatten(), expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(x0, y + s_k**2 * total, rtol=1e-9, atol=1e-9)
    assert counting.calls == [8, 16]


def test_prior_correction():
    """At the first step ``prior_correction`` adds −(Σβ − 1)‖x_T‖²/(2 s²) (s = 1 for a VP process)."""
    plain = FeynmanKacCorrector.annealing(2.5, 4, **NEVER)
    x, _, _, _ = one_step(plain, 0)
    corrected = FeynmanKacCorrector.annealing(2.5, 4, prior_correction=True, **NEVER)
    one_step(corrected, 0)
    expected = plain.log_weights.flatten() - 1.5 * (x * x).sum(1) / 2
    assert torch.allclose(corrected.log_weights.flatten(), expected, rtol=1e-12)


def test_per_sample_levels_and_clamp():
    """α, σ as per-sample tensors (the time shift) give the host floats' increments; ``clamp`` centres each group's
    increments and bounds them."""
    fk = FeynmanKacCorrector.product(LABELS, 4, **NEVER)
    x, _, _, run_ = one_step(fk, 20)
    predictions = [
        MIX2D.denoise(x, float(run_.plan.alpha_t[20]), float(run_.plan.sigma_t[20]), torch.tensor([c])) for c in (0, 1)
    ]
    scalar = StepContext(20, run_, 0.0, float(run_.plan.alpha_t[20]), float(run_.plan.sigma_t[20]))
    tensors = StepContext(
        20,
        run_,
        0.0,
        torch.full((8, 1), scalar.alpha, dtype=torch.float64),
        torch.full((8, 1), scalar.sigma, dtype=torch.float64),
    )
    a = FeynmanKacCorrector.increment(scalar, x, predictions, [1.0, 1.0])
    b = FeynmanKacCorrector.increment(tensors, x, predictions, [1.0, 1.0])
    assert torch.allclose(a, fk.log_weights.flatten(), rtol=1e-12) and torch.allclose(a, b, rtol=1e-12)
    clamped = FeynmanKacCorrector.product(LABELS, 4, clamp=0.05, **NEVER)
    one_step(clamped, 20)
    w = clamped.log_weights
    assert float(w.abs().max()) <= 0.05 + 1e-15 and float(w.abs().max()) > 0
    centred = (a.view(2, 4) - a.view(2, 4).mean(1, keepdim=True)).clamp(-0.05, 0.05)
    assert torch.allclose(w, centred, rtol=1e-12)


# -- 5. bad input and batch independence --------------------------------------------------------------------------
def test_seeded_results_do_not_depend_on_the_batch(anneal_model):
    k, n = 4, 24
    runs = []
    for batch_size in (None, 8, 12):
        fk = FeynmanKacCorrector.annealing(2.0, k, interval=2)
        runs.append((run(anneal_model, fk, n, steps=10, seeds=range(100, 100 + n), batch_size=batch_size), fk))
    for x, fk in runs[1:]:
        assert torch.equal(x, runs[0][0])
        assert torch.equal(
            torch.cat([r.ancestors for r in fk.history if r.index == 9]), runs[0][1].history[-1].ancestors
        )
    assert any(not torch.equal(r.ancestors, torch.arange(n)) for r in runs[0][1].history)  # it did resample
    with pytest.raises(ValueError, match="multiple of 4"):
        run(anneal_model, FeynmanKacCorrector.annealing(2.0, k), n, steps=4, seeds=range(n), batch_size=6)


def test_bad_runs(anneal_model):
    with pytest.raises(ValueError, match="stochastic sampler"):
        run(anneal_model, FeynmanKacCorrector.annealing(2.0, 4), 8, steps=4, solver=DPMSolverPlusPlus(2))
    with pytest.raises(ValueError, match="uncond=... to sample"):
        run(anneal_model, FeynmanKacCorrector.classifier_free(2.0, 4), 8, steps=4)
    fk = FeynmanKacCorrector.annealing(2.0, 4)
    process = default_process()
    plan = EulerMaruyama().plan(process, uniform_logsnr(process, 4))
    x = torch.zeros(8, 1, dtype=torch.float64)
    run_ = SamplingRun.start(
        EulerMaruyama(), plan, x, denoiser=anneal_model, guidance=fk, noise=NoiseSource(seeds=range(8))
    )
    with pytest.raises(ValueError, match="guide_x0 hook"):
        step(run_, 0, x, x0=x)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FeynmanKacCorrector([], 4), "at least one expert"),
        (lambda: FeynmanKacCorrector([Expert(math.nan)], 4), "finite"),
        (lambda: FeynmanKacCorrector([Expert(math.inf, "uncond")], 4), "finite"),
        (lambda: FeynmanKacCorrector([Expert(1.0, "class")], 4), "'cond', 'uncond' or a mapping"),
        (lambda: FeynmanKacCorrector([Expert(-1.0), Expert(0.5, "uncond")], 4), "sum to a positive"),
        (lambda: FeynmanKacCorrector.annealing(0.0, 4), "annealing exponent"),
        (lambda: FeynmanKacCorrector.annealing(-2.0, 4), "annealing exponent"),
        (lambda: FeynmanKacCorrector.annealing(2.0, 0), "num_particles"),
        (lambda: FeynmanKacCorrector.annealing(2.0, 4, ess_threshold=0.0), "ESS threshold"),
        (lambda: FeynmanKacCorrector.annealing(2.0, 4, ess_threshold=1.5), "ESS threshold"),
        (lambda: FeynmanKacCorrector.annealing(2.0, 4, clamp=0.0), "clamp"),
        (lambda: FeynmanKacCorrector.annealing(2.0, 4, clamp=math.inf), "clamp"),
        (lambda: FeynmanKacCorrector.product(LABELS, 4, betas=[1.0]), "2 conditions"),
        (lambda: FeynmanKacCorrector.classifier_free(math.nan, 4), "finite"),
    ],
)
def test_bad_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_experts_merge():
    """Experts on the same condition add their β; β = 0 drops a factor (CFG with w = 1 is the conditional model,
    without an extra call); the "cond" expert serves the step's own call."""
    assert FeynmanKacCorrector([Expert(1.0, "uncond"), Expert(2.0), Expert(0.5)], 2)._terms == [
        ("cond", 2.5),
        ("uncond", 1.0),
    ]
    assert FeynmanKacCorrector.classifier_free(1.0, 2)._terms == [("cond", 1.0)]
