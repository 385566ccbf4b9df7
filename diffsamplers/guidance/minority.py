"""Minority guidance (Um, Lee & Ye, "Don't Play Favorites: Minority Guidance for Diffusion Models", ICLR 2024,
arXiv:2301.12334) as a :class:`~diffsamplers.step.Guidance` acting on x̂0.

The paper samples from p̃(x_t | l̃) with a minority classifier p_ψ(l̃ | x_t) of the quantised minority score
(:mod:`diffsamplers.models.minority_classifier`, :mod:`diffsamplers.tuning.minority`), Eq. 8 in score form:

    ∇ₓ log p̃(x_t | l̃) = ∇ₓ log p(x_t) + w ∇ₓ log p_ψ(l̃ | x_t, t),

with the target level l̃ = L − 1 (the most unique) by default. For x_t = α x0 + σ ε, Tweedie's formula
x̂0 = (x_t + σ² ∇ₓ log p(x_t))/α (Efron 2011; Eq. 2 of the paper) turns the guided score into a guided x̂0:

    x̂0 ← x̂0 + w · (σ²/α) · ∇ₓ log p_ψ(l̃ | x_t, t),

equivalently ε̂ ← ε̂ − w σ ∇ₓ log p_ψ. That is what :meth:`MinorityGuidance.guide_x0` does, so the guidance works
with every solver through the step's ``guide_x0`` hook (deterministic or stochastic, single- or multistep).

**Convention at equal w.** The ε-form above is exactly ADM's ``condition_score`` (Dhariwal & Nichol 2021, Eq. 14,
their DDIM guidance). The official minority-guidance code samples ancestrally with ADM's ``condition_mean``
instead: μ ← μ_θ + w Σ_θ ∇ₓ log p_ψ, Σ_θ the step's variance. Our x̂0 shift moves the DDPM posterior mean by
w · β_t/√(1 − β_t) · ∇ₓ log p_ψ (β_t of the step taken), so the two agree where Σ_θ ≈ β_t (ADM's large
variance; a fine grid away from the data) and differ by the factor β_t/(√(1 − β_t) Σ_θ) otherwise — with the
small variance β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) the mean-shift form guides less in the last steps, and on a
coarse grid (few steps) the per-step factor is far from 1. A w tuned for the official code is a starting point
here, not the same strength.

Only the classifier is differentiated (the diffusion model's x̂0 is used as computed), so the guidance does not set
``needs_grad`` and costs one classifier forward and backward per step. The classifier sees the sampler's own x_t
and its noise level log σ̃ = log(σ/α) of the evaluation point (per sample under the time shift), which needs no
mapping of respaced indices back to training steps. The added term is treated as a constant of x (no
second-order graph when the run itself is differentiated).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..models.minority_classifier import MinorityClassifier
from ..step import Guidance, StepContext

__all__ = ["MinorityGuidance"]


def _per_sample(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A host float or a per-sample tensor as a (batch,) tensor on ``like``'s device in its dtype (no host read)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    return t.expand(like.shape[0]) if t.numel() == 1 else t


class MinorityGuidance(Guidance):
    """x̂0 ← x̂0 + w σ²/α ∇ₓ log p_ψ(``level`` | x_t, σ̃) (module docstring; Um et al. 2024, Eq. 8).

    Args:
        classifier: the minority classifier p_ψ of the model being sampled (its levels 0 … L − 1).
        level: the target minority level l̃ (the paper: L − 1, the most unique).
        w: the guidance scale (≥ 0; 0 leaves x̂0 untouched, bit for bit).
    """

    def __init__(self, classifier: MinorityClassifier, level: int, w: float):
        if not isinstance(classifier, MinorityClassifier):
            raise TypeError(f"classifier must be a MinorityClassifier, got {type(classifier).__name__}")
        levels = classifier.num_levels
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < levels:
            raise ValueError(
                f"level must be a minority level in 0..{levels - 1} (this classifier's L = {levels}), got {level!r}"
            )
        w = float(w)
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"the minority guidance scale w must be a finite number >= 0, got {w!r}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.level = int(level)
        self.w = w

    def log_prob(self, x: torch.Tensor, log_sigma_tilde: torch.Tensor | float) -> torch.Tensor:
        """log p_ψ(level | x, σ̃) per sample."""
        logits = self.classifier(x, log_sigma_tilde)
        return torch.log_softmax(logits.float(), dim=1)[:, self.level]

    def gradient(self, x: torch.Tensor, log_sigma_tilde: torch.Tensor | float) -> torch.Tensor:
        """∇ₓ log p_ψ(level | x, σ̃), in ``x``'s dtype and shape (the classifier runs in its own dtype)."""
        param = next(self.classifier.parameters())
        with torch.enable_grad():
            x_in = x.detach().to(device=param.device, dtype=param.dtype).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x_in, log_sigma_tilde).sum(), x_in)
        return grad.to(device=x.device, dtype=x.dtype)

    def guide_x0(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.w == 0.0:
            return x0
        alpha, sigma = _per_sample(ctx.alpha, x0), _per_sample(ctx.sigma, x0)
        scale = (self.w * sigma * sigma / alpha).view(-1, *([1] * (x0.ndim - 1)))
        # σ = 0 (the data) gives scale 0; the clamp keeps the classifier's input finite there.
        log_sigma_tilde = torch.log(sigma / alpha).clamp_min(-30.0).float()
        return x0 + scale * self.gradient(x, log_sigma_tilde).to(x0.dtype)

    def __repr__(self) -> str:
        return f"MinorityGuidance(level={self.level}, w={self.w:g}, num_levels={self.classifier.num_levels})"
