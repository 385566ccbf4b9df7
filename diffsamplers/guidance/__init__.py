"""Guidance: methods that act inside a sampling step.

The hooks live with the step function (:mod:`diffsamplers.step`): a guidance changes the conditions before the
model call (``condition``), x̂0 after it (``guide_x0``, with the gradient with respect to x when it asks for it)
and the sample after the solver's update (``transition``: candidates, resampling). Classifier-free guidance is the
denoiser's ``guidance_scale``.
"""

from ..step import Conditions, Guidance, Move, StepContext

__all__ = ["Conditions", "Guidance", "Move", "StepContext"]
