"""DPM-Solver++ singlestep, orders 1–3 ("2S", "3S") (Lu et al. 2022, arXiv:2211.01095, Alg. 1 and
App. B; the intermediate points as in DPM-Solver, Lu et al. 2022, arXiv:2206.00927, Alg. 4–5).

Every point of the schedule is a model evaluation. The evaluations are grouped into outer steps s → t of
order 1, 2 or 3 whose inner points are the schedule's own interior points, at r_i = (λ_i − λ_s)/h (r₁ = ½,
or ⅓ and ⅔, exactly on a uniform-logSNR grid). Per outer step, with φ₁ = e^{−h} − 1, φ₂ = φ₁/h + 1:

* 2S: u = (σ_u/σ_s) x_s + α_u (1 − e^{−r₁h}) D_s;
      x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) [D_s + (D_u − D_s)/(2 r₁)]
* 3S: u₁ as above at r₁; u₂ = (σ₂/σ_s) x_s + α₂ (1 − e^{−r₂h}) D_s + (r₂/r₁) α₂ φ₂₂ (D_{u₁} − D_s),
      φ₂₂ = (e^{−r₂h} − 1)/(r₂h) + 1; x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) D_s + (1/r₂) α_t φ₂ (D_{u₂} − D_s)

The order mix for an NFE budget follows the official ``DPM_Solver.sample(method="singlestep")``; an outer
step that ends at σ = 0 is split so that the last update is first order.
"""

from __future__ import annotations

import numpy as np

from ..noise import NoiseProcess
from .base import LinearStep, Solver, marginals
from .thresholding import DynamicThresholding

__all__ = ["DPMSolverPlusPlusSinglestep", "singlestep_orders"]


def singlestep_orders(num_evals: int, order: int, final_zero: bool) -> list[int]:
    """Orders of the outer steps spending exactly ``num_evals`` model evaluations (official recipe)."""
    k = num_evals
    if order == 1:
        orders = [1] * k
    elif order == 2:
        orders = [2] * (k // 2) + [1] * (k % 2)
    else:
        m = k // 3
        orders = {0: [3] * (m - 1) + [2, 1], 1: [3] * m + [1], 2: [3] * m + [2]}[k % 3]
    if final_zero and orders[-1] > 1:
        last = orders.pop()
        orders += [last - 1, 1]
    return orders


class DPMSolverPlusPlusSinglestep(Solver):
    """DPM-Solver++(2S)/(3S) on the points of a schedule; NFE = number of schedule steps."""

    def __init__(self, order: int = 2, thresholding: DynamicThresholding | None = None):
        super().__init__(x0_transform=thresholding)
        if order not in (1, 2, 3):
            raise ValueError(f"singlestep DPM-Solver++ order must be 1, 2 or 3, got {order!r}")
        self.order = int(order)
        self.name = f"dpm++{order}s"

    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        lam, alpha, sigma = marginals(process, sigmas)
        steps: list[LinearStep] = []
        start = 0
        for o in singlestep_orders(sigmas.size - 1, self.order, final_zero=sigmas[-1] == 0.0):
            s, t = start, start + o
            h = lam[t] - lam[s]
            # The first evaluation of every outer step is a first-order step to the next point.
            d0 = alpha[s + 1] * -np.expm1(-(lam[s + 1] - lam[s]))
            steps.append(LinearStep(x=float(sigma[s + 1] / sigma[s]), history=(float(d0),), save_anchor=o > 1, order=o))
            if o == 2:
                r1 = (lam[s + 1] - lam[s]) / h
                base = alpha[t] * -np.expm1(-h)
                steps.append(
                    LinearStep(
                        x=0.0,
                        anchor=float(sigma[t] / sigma[s]),
                        history=(float(base / (2 * r1)), float(base * (1 - 1 / (2 * r1)))),
                        order=o,
                    )
                )
            elif o == 3:
                r1 = (lam[s + 1] - lam[s]) / h
                r2 = (lam[s + 2] - lam[s]) / h
                phi22 = np.expm1(-r2 * h) / (r2 * h) + 1.0
                w_u1 = r2 / r1 * alpha[s + 2] * phi22
                steps.append(
                    LinearStep(
                        x=0.0,
                        anchor=float(sigma[s + 2] / sigma[s]),
                        history=(float(w_u1), float(alpha[s + 2] * -np.expm1(-r2 * h) - w_u1)),
                        order=o,
                    )
                )
                phi2 = np.expm1(-h) / h + 1.0
                w_u2 = alpha[t] * phi2 / r2
                steps.append(
                    LinearStep(
                        x=0.0,
                        anchor=float(sigma[t] / sigma[s]),
                        history=(float(w_u2), 0.0, float(alpha[t] * -np.expm1(-h) - w_u2)),
                        order=o,
                    )
                )
            start = t
        return np.asarray(sigmas[:-1], dtype=np.float64), steps, self.order
