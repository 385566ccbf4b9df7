"""The exact Gaussian-mixture model: its denoiser, its network form and the SciPy reference ODE solution."""

import math

import numpy as np
import pytest
import torch

from diffsamplers.models.gmm import (
    GaussianMixture,
    default_flow_process,
    default_mixture,
    default_process,
    reference_solution,
)
from diffsamplers.noise import ContinuousVP, RectifiedFlow, VarianceExploding
from diffsamplers.prediction import to_x0

PROCESS = default_process()
FLOW = default_flow_process()


def _gaussian_flow(gmm, process, x_T, sigma_start, sigma_end):
    """Closed-form PF-ODE solution for a single Gaussian (Wang & Vastola 2024, general α/σ form)."""
    mu, lam, u = gmm.means[0], gmm.eigvals[0], gmm.eigvecs[0]
    a_T, s_T = (float(v) for v in process.alpha_sigma(sigma_start))
    a_t, s_t = (float(v) for v in process.alpha_sigma(sigma_end))
    flat = x_T.double().reshape(x_T.shape[0], -1)
    coords = (flat - a_T * mu) @ u
    scale = torch.sqrt((a_t**2 * lam + s_t**2) / (a_T**2 * lam + s_T**2))
    return (a_t * mu + (coords * scale) @ u.T).reshape(x_T.shape)


@pytest.mark.parametrize(
    "process", [PROCESS, ContinuousVP("cosine"), VarianceExploding(0.002, 80.0), RectifiedFlow()], ids=type
)
def test_reference_solution_matches_gaussian_closed_form(process):
    gmm = GaussianMixture.random((1, 4, 4), num_components=1, seed=3, eig_range=(1e-3, 1.0))
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start, end = process.sigma_max, process.sigma_min
    ref = reference_solution(gmm, process, x_T, start, end)
    exact = _gaussian_flow(gmm, process, x_T, start, end)
    assert float((ref - exact).abs().max()) < 1e-8 * max(1.0, float(exact.abs().max()))
    # All the way to σ = 0 too.
    exact0 = _gaussian_flow(gmm, process, x_T, start, 0.0)
    assert float((reference_solution(gmm, process, x_T, start, 0.0) - exact0).abs().max()) < 1e-8


def test_reference_solution_from_pure_noise_matches_gaussian_closed_form():
    """sigma_start = inf: x_T = ε at t = 1 of the flow, where τ = log σ̃ cannot start (the ρ = α/σ leg)."""
    gmm = GaussianMixture.random((1, 4, 4), num_components=1, seed=3, eig_range=(1e-3, 1.0))
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for end in (0.0, FLOW.sigma_min, 0.5, 1.0, 3.0):  # through the switch at σ̃ = 1, ending before and at it
        exact = _gaussian_flow(gmm, FLOW, x_T, math.inf, end)
        assert float((reference_solution(gmm, FLOW, x_T, math.inf, end) - exact).abs().max()) < 1e-8, end


def test_reference_solution_from_pure_noise_agrees_with_a_start_just_below_it():
    """The mixture from t = 1 against the τ form started at σ̃ = 1e6 from the first-order state x = σ(ε + ρ·E[x0])
    (z = x/σ moves as dz/dρ = D(z; ρ, 1) = E[x0] + O(ρ) there): two integrations that share no step."""
    gmm = default_mixture()
    eps = torch.randn(8, *gmm.sample_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mean = (gmm.weights[:, None] * gmm.means).sum(0).reshape(gmm.sample_shape)
    start = 1e6
    alpha, sigma = (float(v) for v in FLOW.alpha_sigma(start))
    from_inf = reference_solution(gmm, FLOW, eps, math.inf, 0.0)
    from_start = reference_solution(gmm, FLOW, sigma * (eps + alpha / sigma * mean), start, 0.0)
    assert float((from_inf - from_start).abs().max()) < 1e-7
    assert float((from_inf - eps).abs().max()) > 0.1  # it did move


def test_reference_solution_from_pure_noise_needs_a_finite_sigma_there():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="sigma_start = inf needs a process with a finite σ at pure noise"):
        reference_solution(default_mixture(), VarianceExploding(0.002, 80.0), x, math.inf, 0.0)
    with pytest.raises(ValueError, match="must exceed"):
        reference_solution(default_mixture(), FLOW, x, math.inf, math.inf)


def test_flow_denoiser_and_network_at_pure_noise():
    """t = 1 (σ̃ = ∞), where FlowMatchEulerDiscreteScheduler makes its first model call (timestep 1000)."""
    alpha, sigma = FLOW.alpha_sigma(math.inf)
    assert (float(alpha), float(sigma)) == (0.0, 1.0)
    a, s = FLOW.alpha_sigma(np.array([0.0, 1.0, math.inf]))
    assert a.tolist() == [1.0, 0.5, 0.0] and s.tolist() == [0.0, 0.5, 1.0]
    assert float(FLOW.sigma_tilde(FLOW.t_from_timestep(1000.0))) == math.inf
    gmm = default_mixture()
    x = torch.randn(6, *gmm.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = (gmm.weights[:, None] * gmm.means).sum(0).reshape(gmm.sample_shape)
    x0 = gmm.denoise(x, 0.0, 1.0)
    assert torch.isfinite(x0).all() and torch.allclose(x0, mean.expand_as(x0), atol=1e-12)
    per_sample = gmm.denoise(x, torch.tensor([0.0, 0.5] * 3, dtype=torch.float64), torch.tensor([1.0, 0.5] * 3))
    assert torch.allclose(per_sample[0::2], x0[0::2], atol=1e-12)
    # Scale invariance, D(s·x; s·α, s·σ) = D(x; α, σ), which the reference's ρ leg relies on.
    assert torch.allclose(gmm.denoise(3.0 * x, 3.0 * 0.2, 3.0 * 0.8), gmm.denoise(x, 0.2, 0.8), atol=1e-12)
    # The velocity network at timestep 1000: v = ε − x0 with ε = x.
    v = gmm.as_model(FLOW, "flow_prediction")(x, torch.tensor(1000.0)).sample
    assert torch.allclose(v, x - mean, atol=1e-12)
    assert torch.equal(gmm.as_denoiser(FLOW, "flow_prediction").model(x, 1000.0).sample, v)


def test_denoiser_is_posterior_mean_by_monte_carlo():
    gmm = GaussianMixture.random((3,), num_components=3, seed=0, eig_range=(0.05, 0.3))
    g = torch.Generator().manual_seed(0)
    alpha, sigma = 0.8, 0.6
    x0 = gmm.sample(400_000, generator=g, dtype=torch.float64)
    xt = alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # E[x0 | x_t] averaged over a small ball around a point ≈ the denoiser there.
    centre = xt[0:1]
    near = (xt - centre).norm(dim=1) < 0.15  # E[x0 | x_t in ball] = mean of E[x0 | x_t] over the ball
    assert near.sum() > 200
    mc = x0[near].mean(0)
    exact = gmm.denoise(xt[near], alpha, sigma).mean(0)
    assert float((mc - exact).abs().max()) < 0.05


def test_denoiser_limits_and_per_sample_coefficients():
    gmm = default_mixture()
    x = gmm.sample(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # At σ → 0 the denoiser returns the clean sample itself.
    assert float((gmm.denoise(x, 1.0, 1e-8) - x).abs().max()) < 1e-6
    # At huge noise it returns the data mean.
    mean = (gmm.weights[:, None] * gmm.means).sum(0).reshape(gmm.sample_shape)
    far = gmm.denoise(1e6 * torch.randn_like(x), 1.0, 1e6)
    assert float((far - mean).abs().max()) < 1e-4
    # Per-sample (α, σ) agree with scalar calls.
    a = torch.tensor([0.9, 0.5] * 4, dtype=torch.float64)
    s = torch.sqrt(1 - a**2)
    batched = gmm.denoise(x, a, s)
    for i in (0, 1):
        single = gmm.denoise(x[i : i + 1], float(a[i]), float(s[i]))
        assert torch.allclose(batched[i : i + 1], single, atol=1e-12)


def test_isotropic_components_take_the_inner_product_path_and_agree_with_the_general_one():
    gmm = GaussianMixture.isotropic(96, 5, 0.15, (0.5, 1.0), 0.5, seed=7)
    assert gmm.isotropic_components and not default_mixture().isotropic_components
    general = GaussianMixture(gmm.means, gmm.eigvals, gmm.eigvecs, gmm.weights, gmm.sample_shape)
    general.isotropic_components = False  # the (B, K, d) path
    g = torch.Generator().manual_seed(1)
    x0 = gmm.sample(32, generator=g, dtype=torch.float64)
    a = torch.rand(32, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s = torch.sqrt(1 - a**2)
    x = a[:, None] * x0 + s[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    log_w = torch.randn(32, 5, generator=g, dtype=torch.float64)
    for alpha, sigma, lw in ((a, s, None), (0.999, 0.02, None), (0.3, 0.95, log_w), (a, s, log_w)):
        fast, slow = gmm.denoise(x, alpha, sigma, lw), general.denoise(x, alpha, sigma, lw)
        assert fast.dtype == slow.dtype == torch.float64
        assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-11)
    # float32 in: float32 out, within float32 rounding of the general path's float64 value.
    fast32 = gmm.denoise(x.float(), a.float(), s.float())
    assert fast32.dtype == torch.float32
    assert float((fast32.double() - general.denoise(x, a, s)).abs().max()) < 1e-5


@pytest.mark.parametrize("mixture", ["isotropic", "rotated"])
def test_component_is_the_most_probable_one(mixture):
    """Samples drawn from well-separated components are assigned to them; near a mean, that component wins; the
    inner-product path (isotropic) and the general one agree."""
    if mixture == "isotropic":
        gmm = GaussianMixture.isotropic(64, 6, 0.1, (0.7, 1.0), 1.0, seed=2)
    else:
        gmm = GaussianMixture.random((64,), num_components=5, seed=3, mean_scale=1.0, eig_range=(1e-3, 1e-2))
    g = torch.Generator().manual_seed(0)
    comp = torch.multinomial(gmm.weights, 300, replacement=True, generator=g)
    noise = torch.randn(300, 64, generator=g, dtype=torch.float64)
    if mixture == "isotropic":
        x = gmm.means[comp] + gmm.eigvals[comp].sqrt() * noise
    else:
        x = gmm.means[comp] + torch.einsum("nde,ne->nd", gmm.eigvecs[comp], gmm.eigvals[comp].sqrt() * noise)
    assert torch.equal(gmm.component(x, chunk=64), comp)
    assert torch.equal(gmm.component(gmm.means.float()), torch.arange(gmm.means.shape[0]))
    general = GaussianMixture(gmm.means, gmm.eigvals, gmm.eigvecs, gmm.weights, gmm.sample_shape)
    general.isotropic_components = False
    assert torch.equal(general.component(x), gmm.component(x))
    with pytest.raises(ValueError, match="sample shape"):
        gmm.component(torch.zeros(2, 63))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction", "flow_prediction"])
def test_network_form_predicts_every_parametrisation(prediction_type):
    gmm = default_mixture()
    process = RectifiedFlow() if prediction_type == "flow_prediction" else PROCESS
    model = gmm.as_model(process, prediction_type)
    x = torch.randn(5, *gmm.sample_shape, dtype=torch.float64)
    t = 0.3 if prediction_type == "flow_prediction" else 420.0
    timestep = float(process.timestep(t))
    a, s = (float(v) for v in process.alpha_sigma(process.sigma_tilde(t)))
    out = model(x, torch.tensor(timestep)).sample
    np.testing.assert_allclose(to_x0(out, x, a, s, prediction_type), gmm.denoise(x, a, s), atol=1e-9)


def test_sampling_matches_mixture_moments():
    gmm = GaussianMixture.random((2,), num_components=2, seed=5, eig_range=(0.01, 0.2))
    x = gmm.sample(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    assert float((x.mean(0) - mean).abs().max()) < 0.01


def test_bad_mixtures():
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianMixture.from_covariances(np.zeros((1, 2)), np.array([[[1.0, 0.0], [0.0, -1.0]]]))
    with pytest.raises(ValueError, match="does not hold"):
        GaussianMixture.from_covariances(np.zeros((1, 2)), np.eye(2)[None], sample_shape=(3,))
    with pytest.raises(ValueError, match="must exceed"):
        reference_solution(default_mixture(), PROCESS, torch.zeros(1, 1, 8, 8), 1.0, 2.0)


def test_default_mixture_is_reproducible():
    a, b = default_mixture(), default_mixture()
    assert torch.equal(a.means, b.means) and a.sample_shape == (1, 8, 8)
    assert math.isclose(float(a.weights.sum()), 1.0)
