"""DPM-Solver++ multistep, orders 1–3, ODE and SDE (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", arXiv:2211.01095).

With λ = log(α/σ), h = λ_t − λ_s and the data prediction D = x̂0, the exact solution of the diffusion ODE is
(Eq. 9) x_t = (σ_t/σ_s) x_s + σ_t ∫ e^λ x̂0(λ) dλ. Expanding x̂0 in λ and integrating gives

* order 1 (Eq. 10, ≡ DDIM):  x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) D_s
* 2M (Alg. 2, "midpoint"):   add ½ α_t (1 − e^{−h}) D1, with D1 = (D_s − D_{s−1})/r, r = h_{s−1}/h;
  ("heun"/Taylor form: add α_t φ₂(h) D1, φ₂(h) = (e^{−h} − 1)/h + 1)
* 3M: add α_t φ₂(h) D1 + w₂ D2 with the divided differences D1 = Δ0 + r0/(r0+r1)(Δ0 − Δ1) ≈ h x̂0′ and
  D2 = (Δ0 − Δ1)/(r0 + r1) ≈ ½ h² x̂0″.

The weight w₂ of the third-order term comes in two forms (``third_order``):

* ``"reference"`` — the official code's, k-diffusion's and diffusers': w₂ = −α_t φ₃(h),
  φ₃(h) = (e^{−h} − 1 + h)/h² − ½ (and, for the SDE, diffusers' (1 − e^{−2h} − 2h)/(2h)² − ½). Since
  D2 ≈ ½ h² x̂0″ while the exact integral σ_t ∫ e^λ ½(λ − λ_s)² x̂0″ dλ = α_t (h²/2 − h + 1 − e^{−h}) x̂0″,
  this weight is half the Taylor value (ODE), so the method's global order is 2, not 3 (the tests show it);
* ``"taylor"`` (default) — the exact Taylor weight w₂ = 2 α_t (h²/2 − h + 1 − e^{−h})/h² for the ODE and
  2 α_t (h²/2 − h/2 + ¼ − e^{−2h}/4)/h² for the SDE, which restores third order.

SDE-DPM-Solver++ (Lu et al. 2022, Appendix; diffusers' ``sde-dpmsolver++``) solves the reverse SDE:
x_t = (σ_t/σ_s) e^{−h} x_s + α_t (1 − e^{−2h}) D_s + σ_t √(1 − e^{−2h}) z, plus the analogous D1/D2 terms.

Warm-up and final steps follow diffusers' ``DPMSolverMultistepScheduler``: step k has order
min(order, k + 1); the last step is first order when it ends at σ = 0 (λ = ∞), with ``euler_at_final``, or
with ``lower_order_final`` below ``lower_order_final_threshold`` steps (which also caps the second-to-last
step at order 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ..noise import NoiseProcess
from .base import LinearStep, LocalCoefficients, Solver, marginals, step_points
from .thresholding import DynamicThresholding

__all__ = ["DPMSolverPlusPlus"]


def _phi_terms(xp: Any, h: Any, sde: bool, third_order: str) -> tuple[Any, Any, Any]:
    """Per α_t and per step: weights of D0, of D1 ≈ h x̂0′ and of D2 ≈ ½ h² x̂0″ for step sizes h.

    A step to σ = 0 has h = ∞ and is always first order: only its D0 weight (1) is meaningful. ``xp`` is
    the array namespace (``numpy`` on the host, ``torch`` for per-sample coefficients on the device).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        if sde:
            em = -xp.expm1(-2.0 * h)  # 1 − e^{−2h}
            w1 = em / (-2.0 * h) + 1.0
            if third_order == "reference":
                w2 = (em - 2.0 * h) / (2.0 * h) ** 2 - 0.5
            else:  # 2 ∫_0^h ½u² e^{−2(h−u)} du · 2/h²
                w2 = 2.0 * (h * h / 2 - h / 2 + em / 4) / h**2
        else:
            em = -xp.expm1(-h)  # 1 − e^{−h}
            w1 = xp.expm1(-h) / h + 1.0
            if third_order == "reference":
                w2 = -((xp.expm1(-h) + h) / h**2 - 0.5)
            else:  # ∫_0^h ½u² e^{u−h} du · 2/h²
                w2 = 2.0 * (h * h / 2 - h - xp.expm1(-h)) / h**2
    finite = xp.isfinite(h)
    return em, xp.where(finite, w1, 0.0), xp.where(finite, w2, 0.0)


class DPMSolverPlusPlus(Solver):
    """DPM-Solver++ multistep (2M, 3M) and SDE-DPM-Solver++, data-prediction form.

    Args:
        order: 1, 2 or 3.
        solver_type: ``"midpoint"`` (the paper's recommendation, diffusers' default) or ``"heun"`` for the
            second-order term.
        sde: solve the reverse SDE (``sde-dpmsolver++``) instead of the probability-flow ODE.
        lower_order_final: lower the order of the last steps when there are fewer than
            ``lower_order_final_threshold`` steps (diffusers uses 15, the official code 10).
        euler_at_final: always take a first-order last step.
        thresholding: dynamic thresholding of x̂0 (pixel-space models only).
        third_order: ``"taylor"`` (third order) or ``"reference"`` (the official/diffusers weight of the
            third-order term, for parity; second order in effect), see the module docstring.
    """

    def __init__(
        self,
        order: int = 2,
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        sde: bool = False,
        lower_order_final: bool = True,
        lower_order_final_threshold: int = 15,
        euler_at_final: bool = False,
        thresholding: DynamicThresholding | None = None,
        third_order: Literal["taylor", "reference"] = "taylor",
    ):
        super().__init__(x0_transform=thresholding)
        if third_order not in ("taylor", "reference"):
            raise ValueError(f"unknown third_order form {third_order!r}: expected 'taylor' or 'reference'")
        self.third_order = third_order
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}: expected 'midpoint' or 'heun'")
        self.order = int(order)
        self.solver_type = solver_type
        self.sde = bool(sde)
        self.lower_order_final = bool(lower_order_final)
        self.lower_order_final_threshold = int(lower_order_final_threshold)
        self.euler_at_final = bool(euler_at_final)
        self.name = ("sde-" if self.sde else "") + ("dpm++1" if order == 1 else f"dpm++{order}m")

    def step_orders(self, num_steps: int, final_sigma: float) -> list[int]:
        """The order of each of ``num_steps`` updates (warm-up and lower-order final steps included)."""
        lower_final = self.lower_order_final and num_steps < self.lower_order_final_threshold
        orders = []
        for k in range(num_steps):
            q = min(self.order, k + 1)
            if k == num_steps - 1 and (self.euler_at_final or lower_final or final_sigma == 0.0):
                q = 1
            if k == num_steps - 2 and lower_final:
                q = min(q, 2)
            orders.append(q)
        return orders

    def local_coefficients(
        self, xp: Any, order: int, lam: Sequence[Any], alpha: Sequence[Any], sigma: Sequence[Any]
    ) -> LocalCoefficients:
        """One multistep update of ``order`` from λ_s = ``lam[1]`` to λ_t = ``lam[0]`` (earlier points after)."""
        h = lam[0] - lam[1]
        a_t = alpha[0]
        w0, w1, w2 = _phi_terms(xp, h, self.sde, self.third_order)
        with np.errstate(divide="ignore", invalid="ignore"):
            c_x = sigma[0] / sigma[1] * (xp.exp(-h) if self.sde else 1.0)
            noise = sigma[0] * xp.sqrt(-xp.expm1(-2.0 * h)) if self.sde else xp.zeros_like(h)
            d0 = a_t * w0
            if order == 1:
                return c_x, (d0,), noise
            r0 = (lam[1] - lam[2]) / h  # h_{k−1}/h_k
            if order == 2:
                # D0 + weight·(D_k − D_{k−1})/r0
                weight = 0.5 * a_t * w0 if self.solver_type == "midpoint" else a_t * w1
                return c_x, (d0 + weight * (1 / r0), weight * (-1 / r0)), noise
            r1 = (lam[2] - lam[3]) / h  # h_{k−2}/h_k
            # Divided differences as weights of (D_k, D_{k−1}, D_{k−2}): Δ0 = (D_k − D_{k−1})/r0,
            # Δ1 = (D_{k−1} − D_{k−2})/r1, D1 = Δ0 + r0/(r0 + r1)(Δ0 − Δ1), D2 = (Δ0 − Δ1)/(r0 + r1).
            zero = xp.zeros_like(h)
            delta0 = (1 / r0, -1 / r0, zero)
            delta1 = (zero, 1 / r1, -1 / r1)
            ratio = r0 / (r0 + r1)
            d1 = tuple(p + ratio * (p - q) for p, q in zip(delta0, delta1))
            d2 = tuple((p - q) / (r0 + r1) for p, q in zip(delta0, delta1))
            first = (d0, zero, zero)
            hist = tuple(f + (a_t * w1) * u + (a_t * w2) * v for f, u, v in zip(first, d1, d2))
            return c_x, hist, noise

    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        n = sigmas.size - 1
        pts = step_points(*marginals(process, sigmas), depth=3)
        table = {q: self.local_coefficients(np, q, *pts) for q in (1, 2, 3)}

        def update(k: int, q: int, lower: tuple[LinearStep, ...] = ()) -> LinearStep:
            c_x, hist, noise = table[q]
            return LinearStep(
                float(c_x[k]), tuple(float(c[k]) for c in hist), noise=float(noise[k]), order=q, lower=lower
            )

        steps = [
            update(k, q, tuple(update(k, m) for m in range(1, q)))
            for k, q in enumerate(self.step_orders(n, float(sigmas[-1])))
        ]
        return np.asarray(sigmas[:-1], dtype=np.float64), steps, self.order
