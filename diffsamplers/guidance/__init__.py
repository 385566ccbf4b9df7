"""Guidance: methods that act inside a sampling step.

The hooks live with the step function (:mod:`diffsamplers.step`): a guidance changes the conditions before the
model call (``condition``), x̂0 after it (``guide_x0``, with the gradient with respect to x when it asks for it)
and the sample after the solver's update (``transition``: candidates, resampling). ``sample(..., guidance=...)``
takes one guidance or a sequence, composed in order. Random draws a guidance makes come from the samples' own
streams (:meth:`StepContext.noise`), so a sample's result does not depend on its batch.

Members: :class:`ClassifierFree` (the simplest: it sets the scale of the batched conditional/unconditional call);
:class:`SelfGuidedMinority` (Um & Ye 2024: ascent on the model's own reconstruction loss, a gradient guidance);
:class:`CADS` (Sadat et al. 2024: the condition's embedding annealed from noise to clean, a ``condition`` hook);
:class:`MinorityGuidance` (Um, Lee & Ye 2024: a minority classifier's gradient added to x̂0, a ``guide_x0`` hook);
:class:`FKSteering` (Singhal et al. 2025: particles resampled by reward potentials towards p(x)·exp(λ r(x)), a
``transition`` hook); :class:`FeynmanKacCorrector` (Skreta et al. 2025: weighted particles for annealed, product and
classifier-free targets); :class:`SVDD` (Li et al. 2024: M candidates per step, the one of highest soft value kept).
Both also steer the masked (discrete) samplers through :class:`GuidedMaskedSampler`. The particle methods share :mod:`~diffsamplers.guidance.particles`; rewards that ship are in
:mod:`~diffsamplers.guidance.rewards`.
"""

from ..step import Conditions, Guidance, Move, StepContext
from .cads import CADS
from .classifier_free import ClassifierFree
from .fk_correctors import Expert, FeynmanKacCorrector
from .fk_steering import FKSteering
from .masked import GuidedMaskedSampler
from .minority import MinorityGuidance
from .particles import ParticleGuidance, ResamplingRecord
from .rewards import DigitsClassProbability, PixelMass
from .self_minority import SelfGuidedMinority
from .svdd import SVDD, select_candidates

__all__ = [
    "CADS",
    "ClassifierFree",
    "Conditions",
    "DigitsClassProbability",
    "Expert",
    "FKSteering",
    "FeynmanKacCorrector",
    "Guidance",
    "GuidedMaskedSampler",
    "MinorityGuidance",
    "Move",
    "ParticleGuidance",
    "PixelMass",
    "ResamplingRecord",
    "SVDD",
    "SelfGuidedMinority",
    "StepContext",
    "select_candidates",
]
