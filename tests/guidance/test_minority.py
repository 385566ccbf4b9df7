"""Classifier-based minority guidance (Um, Lee & Ye 2024, Eq. 8) with the classifier shipped for the digits model:
the x̂0 form of the guided score, w = 0 is the unguided sampler bit for bit, guidance raises the classifier's level
of the samples, bad input is refused by value, the ``minority`` guidance spec."""

from __future__ import annotations

import math

import pytest
import torch

from diffsamplers import DPMSolverPlusPlus, sample
from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import load_model
from diffsamplers.guidance.minority import MinorityGuidance
from diffsamplers.models.minority_classifier import MinorityClassifier, default_minority_dir, load_minority_classifier
from diffsamplers.schedules import uniform_logsnr
from diffsamplers.step import StepContext

pytestmark = pytest.mark.usefixtures("single_thread")
N, STEPS = 24, 8


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


@pytest.fixture(scope="module")
def classifier(digits) -> MinorityClassifier:
    return load_minority_classifier(default_minority_dir(digits.folder))[0]


def _run(bundle, guidance=None) -> torch.Tensor:
    draw = bundle.draw(N, seed=3)
    return sample(
        bundle.denoiser,
        DPMSolverPlusPlus(2),
        uniform_logsnr(bundle.process, STEPS),
        x_T=draw.x_T,
        cond=draw.cond,
        guidance=guidance,
        progress=False,
    )


def test_guided_x0_is_the_tweedie_form_of_the_guided_score(classifier):
    """x̂0 + w σ²/α ∇ₓ log p_ψ(l | x, log σ̃), with host floats and with per-sample tensors (the time shift)."""
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, 16, 16, generator=g)
    alpha, sigma, w, level = 0.6, 0.8, 2.5, 7
    xr = x.clone().requires_grad_(True)
    logp = torch.log_softmax(classifier(xr, math.log(sigma / alpha)), 1)[:, level].sum()
    (grad,) = torch.autograd.grad(logp, xr)
    expected = x0 + w * sigma**2 / alpha * grad
    guidance = MinorityGuidance(classifier, level, w)
    got = guidance.guide_x0(StepContext(0, None, 0, alpha, sigma), x, x0)  # type: ignore[arg-type]
    torch.testing.assert_close(got, expected)
    per_sample = torch.full((4, 1, 1, 1), alpha), torch.full((4, 1, 1, 1), sigma)
    got = guidance.guide_x0(StepContext(0, None, 0, *per_sample), x, x0)  # type: ignore[arg-type]
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad


def test_zero_scale_is_the_unguided_sampler(digits, classifier):
    assert torch.equal(_run(digits, MinorityGuidance(classifier, 9, 0.0)), _run(digits))


def test_guidance_raises_the_classifier_level_of_the_samples(digits, classifier):
    """The classifier's mean predicted level of the final samples (at σ̃ = 0.01, the data end) rises with w."""

    def mean_level(x: torch.Tensor) -> float:
        with torch.no_grad():
            p = torch.softmax(classifier(x, math.log(0.01)), dim=1)
        return float((p * torch.arange(p.shape[1])).sum(1).mean())

    unguided, guided = mean_level(_run(digits)), mean_level(_run(digits, MinorityGuidance(classifier, 9, 4.0)))
    assert guided > unguided + 0.5, (unguided, guided)
    toward_majority = mean_level(_run(digits, MinorityGuidance(classifier, 0, 4.0)))
    assert toward_majority < unguided - 0.5, (unguided, toward_majority)


def test_bad_input_is_refused_by_value(classifier):
    with pytest.raises(ValueError, match=r"0\.\.9 \(this classifier's L = 10\), got 10"):
        MinorityGuidance(classifier, 10, 1.0)
    with pytest.raises(ValueError, match="got -1"):
        MinorityGuidance(classifier, -1, 1.0)
    with pytest.raises(ValueError, match=">= 0, got -0.5"):
        MinorityGuidance(classifier, 9, -0.5)
    with pytest.raises(ValueError, match=">= 0, got nan"):
        MinorityGuidance(classifier, 9, float("nan"))
    with pytest.raises(TypeError, match="MinorityClassifier"):
        MinorityGuidance(torch.nn.Identity(), 9, 1.0)  # type: ignore[arg-type]


def test_minority_spec(digits, tmp_path):
    (guidance,) = parse_guidance("minority:w=2").build(digits)
    assert isinstance(guidance, MinorityGuidance) and guidance.level == 9 and guidance.w == 2.0
    (guidance,) = parse_guidance(f"minority:level=3,w=0.5,classifier={default_minority_dir(digits.folder)}").build(
        digits
    )
    assert guidance.level == 3 and guidance.w == 0.5
    with pytest.raises(ValueError, match="got 12"):
        parse_guidance("minority:level=12").build(digits)
    with pytest.raises(FileNotFoundError, match="no minority classifier at"):
        parse_guidance(f"minority:classifier={tmp_path}").build(digits)
    with pytest.raises(ValueError, match="model 'gmm-cond' ships no minority classifier"):
        parse_guidance("minority:w=1").build(load_model("gmm-cond"))
