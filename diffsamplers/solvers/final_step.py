"""The last step to σ = 0: the solver's own update, or the probability-flow ODE's own limit ("midpoint").

Every schedule that ends at σ̃ = 0 (:data:`diffsamplers.schedules.FINAL_CONVENTIONS`) finishes with one jump from
the last evaluated level σ̃_s to 0. Exponential integrators take it as x_0 = x̂0(x_s) — their first-order update
at σ̃ → 0 (DDIM, DPM-Solver++ with ``lower_order_final``, diffusers' ``final_sigmas_type="zero"``) — and with few
steps σ̃_s is large, so this last jump carries much of the error (issue 15: at 10 evaluations the error of
DPM-Solver++ 2M falls 3–7× on a Gaussian mixture when only the last step changes).

Along the probability-flow ODE in EDM units, y = x/α, dy/dσ̃ = −σ̃ ∇log p_σ̃(y) (Karras et al. 2022, Eq. 3), and
Tweedie's formula gives the denoiser D = y + σ̃² ∇log p_σ̃(y). For a data density that is smooth on the scale σ̃_s,
∇log p_σ̃(y(σ̃)) = g + O(σ̃²) on [0, σ̃_s], so

    y(0) = y_s + ∫_0^σ̃_s σ̃ ∇log p_σ̃ dσ̃ = y_s + ½ σ̃_s² g + O(σ̃_s⁴) = ½ (y_s + D(y_s, σ̃_s)) + O(σ̃_s⁴):

the ODE travels only *half* of the way to the denoised point, while the first-order update goes all the way
(error ½ σ̃_s² |g|). For a Gaussian component of variance λ the exact fraction is κ(u) = (√(1 + u) − 1)/u with
u = σ̃_s²/λ: ½ for σ̃_s² ≪ λ, falling to 0 (the first-order update) when σ̃_s² ≫ λ, i.e. where the data look like
points at the scale of the noise.

``final_step`` of a solver (:meth:`diffsamplers.solvers.base.Solver.with_final_step`):

* ``"solver"`` (default) — the solver's own last update (bit-for-bit diffusers' schedulers);
* ``"midpoint"`` — x_0 = α_0 (½ y_s + ½ x̂0), κ = ½, the limit above; no extra model evaluation;
* a number κ ∈ [0, 1) — x_0 = α_0 (κ y_s + (1 − κ) x̂0), e.g. a κ fitted on held-out noises.

The step's corrector and dynamic compensation (UniPC, DC-Solver) are kept: they act on the sample and the stored
x̂0 before the update. Stochastic last steps (fresh noise at σ̃ = 0 is zero anyway) are deterministic here.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import numpy as np

__all__ = ["FINAL_STEPS", "FinalStep", "check_final_step", "final_step_kappa", "replace_final_step"]

FinalStep = Literal["solver", "midpoint"] | float
#: The named final steps.
FINAL_STEPS = ("solver", "midpoint")


def check_final_step(final_step: object) -> FinalStep:
    """``final_step`` validated: ``"solver"``, ``"midpoint"`` or a float κ in [0, 1)."""
    if isinstance(final_step, str):
        if final_step in FINAL_STEPS:
            return final_step  # type: ignore[return-value]
        try:
            final_step = float(final_step)
        except ValueError:
            raise ValueError(
                f"unknown final_step {final_step!r}: expected one of {FINAL_STEPS} or a number κ in [0, 1)"
            ) from None
    if isinstance(final_step, bool) or not isinstance(final_step, (int, float)):
        raise TypeError(f"final_step must be one of {FINAL_STEPS} or a number κ in [0, 1), got {final_step!r}")
    kappa = float(final_step)
    if not (math.isfinite(kappa) and 0.0 <= kappa < 1.0):
        raise ValueError(f"final_step κ must lie in [0, 1), got {kappa}")
    return kappa


def final_step_kappa(final_step: FinalStep) -> float | None:
    """κ of a final step (``None`` for the solver's own update)."""
    if final_step == "solver":
        return None
    return 0.5 if final_step == "midpoint" else float(final_step)


def replace_final_step(steps: list, alpha: np.ndarray, sigmas: np.ndarray, final_step: FinalStep) -> list:
    """The plan's updates with the last one replaced by x_0 = α_0 (κ x_s/α_s + (1 − κ) x̂0) when the schedule ends
    at σ̃ = 0 (otherwise unchanged). ``alpha``/``sigmas``: α and σ̃ at the K evaluation points and the final level."""
    kappa = final_step_kappa(final_step)
    if kappa is None or not steps or float(sigmas[-1]) != 0.0:
        return steps
    a_s, a_0 = float(alpha[-2]), float(alpha[-1])

    def midpoint(step):  # noqa: ANN001, ANN202 - a LinearStep
        lower = tuple(midpoint(s) for s in step.lower)
        return replace(step, x=kappa * a_0 / a_s, history=((1.0 - kappa) * a_0,), anchor=0.0, noise=0.0, lower=lower)

    return [*steps[:-1], midpoint(steps[-1])]
