"""The exact class-conditional mixture: conditional and unconditional denoisers, guidance, the guided ODE."""

import math

import pytest
import torch

from diffsamplers import Denoiser, DPMSolverPlusPlus, sample
from diffsamplers.models.conditional_gmm import ClassConditionalMixture, GuidedMixture
from diffsamplers.models.gmm import default_process, reference_solution
from diffsamplers.schedules import diffusers_spacing

pytestmark = pytest.mark.usefixtures("single_thread")

PROCESS = default_process()
MIX = ClassConditionalMixture.random(num_classes=3, components_per_class=2, sample_shape=(1, 4, 4), seed=3)


def _x(n=6, seed=0):
    return torch.randn(n, *MIX.sample_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_conditional_denoiser_is_the_class_mixture():
    x = _x()
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    out = MIX.denoise(x, 0.6, 0.8, labels)
    for i, c in enumerate(labels.tolist()):
        mixture = MIX.pooled if c == MIX.null_label else MIX.classes[c]
        assert torch.allclose(out[i : i + 1], mixture.denoise(x[i : i + 1], 0.6, 0.8), atol=1e-12)


def test_unconditional_denoiser_is_the_class_posterior_average():
    """E[x0 | x_t] = Σ_c p(c | x_t) E[x0 | x_t, c], with p(c | x_t) ∝ π_c p(x_t | c) computed independently."""
    x, alpha, sigma = _x(4, 1), 0.7, 0.7
    flat = x.reshape(4, -1)
    log_evidence = []
    for c in MIX.classes:
        cov = torch.einsum("kde,ke,kfe->kdf", c.eigvecs, alpha**2 * c.eigvals, c.eigvecs) + sigma**2 * torch.eye(16)
        dist = torch.distributions.MultivariateNormal(alpha * c.means, covariance_matrix=cov)
        log_evidence.append(torch.logsumexp(dist.log_prob(flat[:, None, :]) + c.weights.log(), dim=1))
    posterior = torch.softmax(torch.stack(log_evidence, 1) + MIX.class_weights.log(), dim=1)  # (B, C)
    per_class = torch.stack([c.denoise(x, alpha, sigma) for c in MIX.classes], 1)  # (B, C, ...)
    expected = torch.einsum("bc,bc...->b...", posterior, per_class)
    assert torch.allclose(MIX.denoise(x, alpha, sigma), expected, atol=1e-10)
    assert torch.allclose(MIX.denoise(x, alpha, sigma, torch.full((4,), MIX.null_label)), expected, atol=1e-10)


def test_network_with_generic_guidance_equals_the_exact_guided_denoiser():
    """Denoiser(ε-network, guidance_scale) — CFG on ε in one batched call — equals D_u + w (D_c − D_u)."""
    x = _x(5, 2).float()
    labels = torch.tensor([0, 1, 2, 0, 1])
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, MIX.null_label)}
    alpha, sigma = PROCESS.alpha_sigma(PROCESS.sigma_tilde(400.0))
    generic = Denoiser(MIX.as_model(PROCESS, "epsilon"), PROCESS, "epsilon", guidance_scale=7.5)
    a = generic.predict_x0(x, 400.0, float(alpha), float(sigma), cond=cond, uncond=uncond)
    b = MIX.as_denoiser(PROCESS, 7.5).predict_x0(x, 400.0, float(alpha), float(sigma), cond=cond, uncond=uncond)
    c = MIX.guided_denoise(x.double(), float(alpha), float(sigma), labels, 7.5)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b.double(), c, atol=1e-5)
    # scale 1 (or no uncond) is the conditional denoiser
    d = MIX.as_denoiser(PROCESS).predict_x0(x, 400.0, float(alpha), float(sigma), cond=cond)
    assert torch.allclose(d.double(), MIX.denoise(x.double(), float(alpha), float(sigma), labels), atol=1e-6)


def test_guided_reference_solution_and_high_nfe_sampling_agree():
    """SciPy's solution of the guided ODE and a 1000-step DPM-Solver++ run agree to < 1e-3 (to σ_min), far
    below the few-step errors (~1e-1) they serve as ground truth for."""
    x = _x(4, 3)
    labels = torch.tensor([0, 1, 2, 1])
    schedule = diffusers_spacing(PROCESS, 999, final="sigma_min")
    den = MIX.as_denoiser(PROCESS, 4.0)
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, MIX.null_label)}
    fine = sample(
        den, DPMSolverPlusPlus(2), schedule, x_T=x, cond=cond, uncond=uncond, dtype=torch.float64, progress=False
    )
    exact = reference_solution(
        GuidedMixture(MIX, labels, 4.0), PROCESS, x, float(schedule.sigmas[0]), PROCESS.sigma_min
    )
    assert float((fine - exact).abs().max()) < 1e-3
    unguided = reference_solution(
        GuidedMixture(MIX, labels, 1.0), PROCESS, x, float(schedule.sigmas[0]), PROCESS.sigma_min
    )
    assert float((exact - unguided).pow(2).mean().sqrt()) > 0.05  # guidance moves the samples


def test_sampling_draws_each_class():
    labels = torch.tensor([0] * 4000 + [2] * 4000)
    draws = MIX.sample(labels, generator=torch.Generator().manual_seed(0), dtype=torch.float64).reshape(8000, -1)
    for c, rows in ((0, slice(0, 4000)), (2, slice(4000, 8000))):
        mean = (MIX.classes[c].weights[:, None] * MIX.classes[c].means).sum(0)
        assert torch.allclose(draws[rows].mean(0), mean, atol=4 * math.sqrt(0.1 / 4000) + 0.01)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"class labels must lie in 0..3"):
        MIX.denoise(_x(2), 0.5, 0.5, torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="integers"):
        MIX.denoise(_x(2), 0.5, 0.5, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="2 labels for a batch of 3"):
        MIX.denoise(_x(3), 0.5, 0.5, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same sample shape"):
        ClassConditionalMixture([MIX.classes[0], ClassConditionalMixture.random(1, 1, (1, 2, 2)).classes[0]])
    with pytest.raises(ValueError, match="class_weights"):
        ClassConditionalMixture(MIX.classes, class_weights=[1.0, -1.0, 1.0])
