"""Held-out evaluation sets for the solver tables: seeded initial noise, conditions and reference samples.

Every table of the package scores a sampler on the same footing: initial noise from
:func:`~diffsamplers.sampling.initial_noise` (through :meth:`ModelBundle.draw`), the reference solution of
:mod:`diffsamplers.reference` from the same noise (the guided ODE when guided), RMS error against it
(:mod:`diffsamplers.metrics.errors`) and the model's sample metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..metrics.errors import rms_error
from ..reference import REFERENCE_STEPS, reference_samples
from .registry import ModelBundle

__all__ = ["ValidationSet", "validation_set", "evaluate"]

Cond = Mapping[str, Any] | None


@dataclass(frozen=True)
class ValidationSet:
    """Initial noises at σ̃_max, their conditions, and their reference samples (``None``: sample metrics only)."""

    x_T: torch.Tensor
    cond: Cond
    uncond: Cond
    guidance_scale: float
    reference: torch.Tensor | None


def validation_set(
    bundle: ModelBundle,
    num_samples: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    reference_steps: int = REFERENCE_STEPS,
    guidance_scale: float = 1.0,
    batch_size: int | None = 256,
) -> ValidationSet:
    """``num_samples`` seeded noises with their conditions and reference samples (``reference_steps=0``: none,
    only sample metrics are scored)."""
    if reference_steps < 0:
        raise ValueError(f"reference_steps must be >= 0, got {reference_steps}")
    draw = bundle.draw(num_samples, seed, guidance_scale, device=device)
    reference = None
    if reference_steps:
        reference = reference_samples(
            bundle.denoiser,
            draw.x_T,
            steps=reference_steps,
            cond=draw.cond,
            uncond=draw.uncond,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
        )
    return ValidationSet(draw.x_T, draw.cond, draw.uncond, guidance_scale, reference)


def evaluate(
    bundle: ModelBundle,
    evaluation: ValidationSet,
    run: Callable[[torch.Tensor, Cond], torch.Tensor],
    sample_metrics: Sequence[str] = (),
) -> dict[str, float]:
    """``run(x_T, cond)`` on the evaluation noises: RMS error against the reference, plus the model's sample
    metrics by name."""
    out = run(evaluation.x_T, evaluation.cond)
    result = {} if evaluation.reference is None else {"rms": rms_error(out, evaluation.reference)}
    for name in sample_metrics:
        result[name] = float(bundle.sample_metric(name)(out))
    return result
