"""The minority score of data under a diffusion model, and its quantisation into minority levels.

Um, Lee & Ye, "Don't Play Favorites: Minority Guidance for Diffusion Models", ICLR 2024 (arXiv:2301.12334),
Sec. 3.1. Tweedie's denoiser is biased toward the majority of the data, so a sample that one-shot denoising
reconstructs badly lies in a low-density ("minority") region. The minority score (Eq. 5) is the expected
reconstruction loss at one perturbation level s:

    ℓ(x0) = E_ε d(x0, x̂0(α_s x0 + σ_s ε)),   ε ~ N(0, I),

with x̂0 the model's Tweedie estimate clipped to the data range (ADM's ``clip_denoised``) and d LPIPS in the paper.
:func:`minority_score` estimates it by Monte Carlo with ``num_draws`` seeded draws. The level s is a normalised
time (process time over the largest one, :attr:`diffsamplers.step.StepContext.time`) or a σ̃ = σ/α, never a
respaced step index: the official code's "index 60 of 100 respaced steps" is original step ≈ 605 of 1000, time
≈ 0.6 here (the default). The distance is pluggable: ``"l2"`` (per-sample Euclidean distance),
``"features"`` (Euclidean distance of the bundled digits feature network's 64-d features, the LPIPS stand-in for
16×16 digits), ``"lpips"`` (only with the ``lpips`` package and its VGG weights already on disk: nothing is
downloaded), or any callable ``d(x0, x0_hat) -> (N,)``.

:func:`minority_levels` quantises the scores of a dataset into L equal-frequency levels (Eq. 6; the official
``construct_ms_dataset.py`` uses ``np.quantile`` thresholds q_j = quantile(ℓ, (j + 1)/L)): level L − 1 holds the
most unique samples. The levels are the labels of the minority classifier
(:mod:`diffsamplers.models.minority_classifier`); they are tied to the scored dataset, the model, s and d.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ..data.digits import to_uint8
from ..denoiser import Denoiser, cond_batch_size, slice_cond
from ..distances import Distance, l2_distance, lpips_distance

__all__ = [
    "DISTANCES",
    "MinorityLevels",
    "assign_levels",
    "feature_distance",
    "l2_distance",
    "lpips_distance",
    "minority_levels",
    "minority_score",
    "resolve_distance",
]

#: The paper's perturbation level: respaced index 60 of 100 ≈ original step 605 of 1000, as a normalised time.
DEFAULT_TIME = 0.6


def feature_distance(extractor: Callable[[torch.Tensor], torch.Tensor]) -> Distance:
    """‖φ(x0) − φ(x̂0)‖₂ per sample, φ a feature network of uint8 images (``bundle.features()``, e.g. the digits
    classifier's 64-d penultimate features); images in [−1, 1] are rounded to uint8 first, as the metrics do."""

    def distance(x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        a = extractor(to_uint8(x0.detach().float().cpu())).double()
        b = extractor(to_uint8(x0_hat.detach().float().cpu())).double()
        return torch.linalg.vector_norm(a - b, dim=1).to(x0.device)

    distance.__name__ = f"features({getattr(extractor, 'name', type(extractor).__name__)})"
    return distance


def _digits_features_distance() -> Distance:
    from ..metrics.fd_digits import digits_features

    return feature_distance(digits_features())


#: Distances by name (factories, so that feature networks load only when asked for).
DISTANCES: dict[str, Callable[[], Distance]] = {
    "l2": lambda: l2_distance,
    "features": _digits_features_distance,
    "lpips": lambda: lpips_distance("vgg"),  # the paper's d
}


def resolve_distance(distance: str | Distance) -> tuple[Distance, str]:
    """A distance and its name from a name of :data:`DISTANCES` or a callable ``d(x0, x0_hat) -> (N,)``."""
    if callable(distance):
        return distance, getattr(distance, "__name__", type(distance).__name__)
    factory = DISTANCES.get(str(distance))
    if factory is None:
        raise ValueError(f"unknown distance {distance!r}: expected one of {sorted(DISTANCES)} or a callable")
    return factory(), str(distance)


def _model_device(denoiser: Denoiser, fallback: torch.device) -> torch.device:
    model = getattr(denoiser, "model", None)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return fallback


def _perturbation(denoiser: Denoiser, time: float | None, sigma_tilde: float | None) -> float:
    """The process time of the perturbation level (exactly one of ``time``, ``sigma_tilde``)."""
    process = denoiser.process
    if (time is None) == (sigma_tilde is None):
        raise ValueError("give the perturbation level as exactly one of time= (normalised, in (0, 1]) or sigma_tilde=")
    if sigma_tilde is not None:
        if not (math.isfinite(sigma_tilde) and sigma_tilde > 0):
            raise ValueError(f"sigma_tilde must be a finite number > 0, got {sigma_tilde!r}")
        return float(process.t_from_sigma_tilde(float(sigma_tilde)))
    assert time is not None
    if not (math.isfinite(time) and 0 < time <= 1):
        raise ValueError(f"time is the normalised perturbation time in (0, 1], got {time!r}")
    return float(time) * float(process.t_max)


@torch.no_grad()
def minority_score(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    time: float | None = DEFAULT_TIME,
    sigma_tilde: float | None = None,
    num_draws: int = 5,
    distance: str | Distance = "l2",
    seed: int = 0,
    cond: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    clip: float | None = 1.0,
) -> torch.Tensor:
    """The minority score ℓ(x0) of each sample (Um et al. 2024, Eq. 5), a float tensor (N,) on ``x0``'s device.

    ℓ(x0) ≈ (1/n) Σ_i d(x0, clip(x̂0(α_s x0 + σ_s ε_i))) over ``num_draws`` = n draws ε_i. The draws come from one
    generator seeded with ``seed``, drawn draw by draw for the whole set, so a sample's score does not depend on
    ``batch_size`` (only on its row and the seed). The model runs on its own device, ``batch_size`` rows at a time.

    Args:
        denoiser: the model, x̂0 = D(x, t, cond).
        x0: clean samples (N, …) in the data range.
        time: the perturbation level as a normalised time in (0, 1] (default 0.6 ≈ the paper's step 605/1000).
        sigma_tilde: the perturbation level as σ̃ = σ/α instead (pass ``time=None``).
        num_draws: Monte-Carlo draws n (the official code's ``n_iter`` = 5).
        distance: ``"l2"``, ``"features"``, ``"lpips"`` or a callable ``d(x0, x0_hat) -> (N,)``.
        seed: the seed of the draws.
        cond: model conditions; tensors with N rows are split with the batch (e.g. the samples' class labels).
        batch_size: rows per model call.
        clip: x̂0 is clipped to [−clip, clip] (the paper's ``clip_denoised``); ``None`` keeps it unclipped.
    """
    if x0.ndim < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch (N, …), got shape {tuple(x0.shape)}")
    if int(num_draws) < 1 or int(batch_size) < 1:
        raise ValueError(f"num_draws and batch_size must be at least 1, got {num_draws} and {batch_size}")
    t = _perturbation(denoiser, time, sigma_tilde)
    alpha, sigma = (float(v) for v in denoiser.process.alpha_sigma(denoiser.process.sigma_tilde(t)))
    measure, _ = resolve_distance(distance)
    n, device = x0.shape[0], _model_device(denoiser, x0.device)
    rows = cond_batch_size(cond)
    if rows is not None and rows not in (1, n):
        raise ValueError(f"cond has {rows} rows for {n} samples")
    generator = torch.Generator().manual_seed(int(seed))
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(int(num_draws)):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        for start in range(0, n, int(batch_size)):
            stop = min(start + int(batch_size), n)
            clean = x0[start:stop].to(device)
            x_t = alpha * clean + sigma * noise[start:stop].to(device=device, dtype=clean.dtype)
            c = slice_cond(cond, start, stop, n) if cond is not None else None
            x0_hat = denoiser(x_t, t, cond=c)
            if clip is not None:
                x0_hat = x0_hat.clamp(-float(clip), float(clip))
            total[start:stop] += measure(clean, x0_hat.to(clean.dtype)).double().cpu()
    return (total / int(num_draws)).to(device=x0.device, dtype=torch.promote_types(x0.dtype, torch.float32))


class MinorityLevels(NamedTuple):
    """Quantised minority scores: ``labels`` (N,) in 0 … L − 1 and the L − 1 ascending ``thresholds``."""

    labels: torch.Tensor
    thresholds: torch.Tensor


def assign_levels(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The level of each score: the number of thresholds strictly below it (a score equal to a threshold stays
    in the lower level), so levels run 0 … len(thresholds)."""
    s = torch.as_tensor(scores).detach().double().cpu().reshape(-1)
    return torch.bucketize(s, torch.as_tensor(thresholds, dtype=torch.float64).cpu(), right=False)


def minority_levels(scores: torch.Tensor, num_levels: int) -> MinorityLevels:
    """L = ``num_levels`` equal-frequency levels of ``scores`` (Um et al. 2024, Eq. 6): thresholds
    q_j = quantile(ℓ, (j + 1)/L) for j = 0 … L − 2 (linear interpolation, as ``np.quantile``) and the labels
    :func:`assign_levels` gives; without ties every level holds ⌊N/L⌋ or ⌈N/L⌉ samples. Level L − 1 is the
    most unique."""
    s = torch.as_tensor(scores).detach().double().cpu().reshape(-1)
    levels = int(num_levels)
    if levels < 2:
        raise ValueError(f"num_levels must be at least 2, got {num_levels}")
    if s.numel() < levels:
        raise ValueError(f"{s.numel()} scores cannot fill {levels} equal-frequency levels")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("the minority scores contain NaN or Inf")
    thresholds = torch.quantile(s, torch.arange(1, levels, dtype=torch.float64) / levels)
    return MinorityLevels(assign_levels(s, thresholds), thresholds)
