"""Model parametrisations: converting a network output to the data prediction x̂0 and back.

With x_t = α x0 + σ ε:

* ``epsilon``:          x̂0 = (x − σ ε̂)/α                      (Ho et al. 2020)
* ``sample``:           x̂0 = output                             (data prediction)
* ``v_prediction``:     v = α ε − σ x0, so x̂0 = α x − σ v̂      (Salimans & Ho 2022, Sec. 4; VP only)
* ``flow_prediction``:  v = ε − x0 (α = 1 − t, σ = t), so x̂0 = x − σ v̂   (Lipman et al. 2023)

These are the only place in the package where the conversions are written; the denoiser, the diffusers
scheduler adapters and the test models all call them.

At high noise the ε conversion is ill-conditioned: x and σ ε̂ nearly cancel and the difference is divided
by a small α (1/α ≈ 157 at t = 999 of DDPM's linear schedule), so float32 arithmetic alone loses about
|x|/α · 2⁻²⁴ ≈ 1e-5. Where α < 1/16 (a host-side test on a known coefficient, no device read) the
conversion is therefore done in float64 and rounded once.
"""

from __future__ import annotations

import torch

__all__ = ["PREDICTION_TYPES", "check_prediction_type", "to_x0", "from_x0"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")

_ALIASES = {
    "eps": "epsilon",
    "epsilon": "epsilon",
    "sample": "sample",
    "x0": "sample",
    "original_sample": "sample",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
    "flow": "flow_prediction",
    "flow_prediction": "flow_prediction",
}

Coefficient = float | torch.Tensor


def check_prediction_type(prediction_type: str) -> str:
    """Canonical name of a prediction type; raises ``ValueError`` naming the bad value."""
    try:
        return _ALIASES[prediction_type]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}") from None


_ILL_CONDITIONED_ALPHA = 1.0 / 16.0


def to_x0(
    output: torch.Tensor, x: torch.Tensor, alpha: Coefficient, sigma: Coefficient, prediction_type: str
) -> torch.Tensor:
    """x̂0 from a network ``output`` at sample ``x`` whose marginal coefficients are (``alpha``, ``sigma``)."""
    if prediction_type == "epsilon":
        if isinstance(alpha, float) and isinstance(sigma, float):
            if alpha < _ILL_CONDITIONED_ALPHA and x.dtype != torch.float64:
                return ((x.double() - sigma * output.double()) / alpha).to(x.dtype)
            return torch.add(x * (1.0 / alpha), output, alpha=-sigma / alpha)  # two kernels
        return (x - sigma * output) / alpha
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output
    if prediction_type == "flow_prediction":
        return x - sigma * output
    raise ValueError(f"unknown prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def from_x0(
    x0: torch.Tensor, x: torch.Tensor, alpha: Coefficient, sigma: Coefficient, prediction_type: str
) -> torch.Tensor:
    """The network output that :func:`to_x0` maps to ``x0`` (inverse conversion)."""
    if prediction_type == "sample":
        return x0
    eps = (x - alpha * x0) / sigma
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "flow_prediction":
        return eps - x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
