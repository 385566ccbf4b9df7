"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) as a :class:`~diffsamplers.step.Guidance`.

x̂0 = x̂0(x, ∅) + w·(x̂0(x, c) − x̂0(x, ∅)) — eq. 6 written for x̂0, which is the same combination as for ε̂ or v̂
(they are affine in x̂0 at a fixed x). The two branches run in one batched call of the denoiser
(:class:`~diffsamplers.denoiser.Denoiser`), so this guidance only sets the scale of the step's call: it is the
simplest member of the interface, and ``sample(..., guidance_scale=w)`` is the same thing. ``scale`` may be a
function of the normalised time t ∈ [0, 1] (1 = noise), e.g. dynamic CFG ŵ = γ(t)·w (Sadat et al. 2024, the CADS
paper's ablation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from ..step import Conditions, Guidance, StepContext

__all__ = ["ClassifierFree"]


class ClassifierFree(Guidance):
    """Classifier-free guidance with scale ``scale`` (> 0; 1 = the conditional model alone), constant or a function
    of the normalised time. The run must have an unconditional input (``uncond``)."""

    def __init__(self, scale: float | Callable[[float], float]):
        if not callable(scale):
            scale = float(scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"classifier-free guidance scale must be a finite number > 0, got {scale!r}")
        self.scale = scale

    def scale_at(self, time: float) -> float:
        """The scale at normalised time ``time``."""
        return float(self.scale(time)) if callable(self.scale) else float(self.scale)

    def condition(self, ctx: StepContext, conditions: Conditions) -> Conditions:
        scale = self.scale_at(ctx.time)
        if scale != 1.0 and conditions.uncond is None:
            raise ValueError(
                f"classifier-free guidance (scale {scale:g}) needs the unconditional input: pass uncond to sample()"
            )
        return replace(conditions, guidance_scale=scale)

    def __repr__(self) -> str:
        return f"ClassifierFree(scale={self.scale!r})"
