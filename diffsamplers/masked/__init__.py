"""Masked (absorbing-state) discrete diffusion: masking schedules, precise categorical sampling, and the ancestral
(MDLM) and first-hitting samplers (Zheng et al., "Masked Diffusion Models are Secretly Time-Agnostic Masked Models
and Exploit Inaccurate Categorical Sampling", 2024, arXiv:2409.02908).

A masked model is any callable ``model(x, t) → logits``: ``x`` a ``(B, L)`` LongTensor over the V real tokens and the
mask id (V by default), ``t`` a ``(B,)`` float tensor or ``None`` (time-agnostic), logits ``(B, L, V)``.
"""

from .categorical import KINDS, TemperatureFit, categorical, effective_temperature
from .samplers import (
    AncestralSampler,
    FirstHittingSampler,
    MaskedDiffusion,
    MaskedModel,
    MaskedSample,
    ancestral_probabilities,
    ancestral_step,
    first_hitting_step,
    first_hitting_times,
)
from .schedules import (
    MASKING_SCHEDULES,
    CosineMasking,
    LinearMasking,
    LogLinearMasking,
    MaskingSchedule,
    PolynomialMasking,
    masking_schedule,
)

__all__ = [
    "KINDS",
    "MASKING_SCHEDULES",
    "AncestralSampler",
    "CosineMasking",
    "FirstHittingSampler",
    "LinearMasking",
    "LogLinearMasking",
    "MaskedDiffusion",
    "MaskedModel",
    "MaskedSample",
    "MaskingSchedule",
    "PolynomialMasking",
    "TemperatureFit",
    "ancestral_probabilities",
    "ancestral_step",
    "categorical",
    "effective_temperature",
    "first_hitting_step",
    "first_hitting_times",
    "masking_schedule",
]
