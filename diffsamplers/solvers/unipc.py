"""UniPC: the unified predictor–corrector, B(h) form, data prediction (Zhao, Bai, Rao, Zhou & Lu 2023,
"UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", arXiv:2302.04867).

One update from s = t_{k} to t = t_{k+1} with the stored data predictions m_s = x̂0(t_k), m_{s−1}, …, in
λ = log(α/σ), h = λ_t − λ_s and ĥ = −h (data prediction), reads (Alg. 2 with the B(h) of Sec. 3.3)

    x_t = (σ_t/σ_s) x_s − α_t (e^{ĥ} − 1) m_s − α_t B(ĥ) Σ_{i=1}^{p−1} ρ_i (m_{s−i} − m_s)/r_i,

with r_i = (λ_{s−i} − λ_s)/h and B(ĥ) = ĥ ("bh1") or e^{ĥ} − 1 ("bh2"). The weights ρ solve the order
conditions R ρ = b (Eq. 9): R is the Vandermonde matrix with rows (r_1^{j−1}, …, r_{p−1}^{j−1}, 1), and
b_j = φ_j(ĥ)·j!/B(ĥ) with φ_1 = (e^{ĥ} − 1)/ĥ − 1, φ_{j+1} = φ_j/ĥ − 1/(j+1)! (the official recursion).

* **UniP-p** (predictor, order p): ρ solves the first p − 1 conditions without the last point; p = 2 uses
  ρ = ½ (the official simplification).
* **UniC-p** (corrector, Alg. 1): once the model has been evaluated at the predicted x_t, x_t is recomputed
  from the same start with the extra difference ρ_p (m_t − m_s), ρ = R⁻¹ b; p = 1 uses ρ = ½. The new
  evaluation m_t is then stored as the next step's newest prediction, so the corrector costs no NFE. Its
  accuracy order is p + 1 (Theorem 3.1).

Every R ρ = b system is solved here once per schedule, on the host in float64 (diffusers'
``UniPCMultistepScheduler`` solves them on the device at every step, ≈ 170 host syncs per 25 steps). The
step schedule follows diffusers: step k has order min(p, k + 1), with ``lower_order_final`` also
min(p, N − k) (at every step count), the corrector at step k uses the order of the predictor it corrects,
and ``disable_corrector`` lists the predictor steps whose result is not corrected. A last step into σ = 0
(λ = ∞) is always first order (it returns x̂0); diffusers' order ≥ 2 step there, and its bh1 first-order step
(B(−∞)·0), return NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np

from ..noise import NoiseProcess
from .base import LinearStep, LocalCoefficients, LocalCorrector, Solver, marginals, step_points
from .thresholding import DynamicThresholding

__all__ = ["UniPC", "unipc_local", "unipc_weights"]

VARIANTS = ("bh1", "bh2")


def _solve_vandermonde(nodes: Sequence[Any], rhs: Sequence[Any]) -> list[Any]:
    """ρ with Σ_i ρ_i r_i^{m−1} = b_m (m = 1 … p, the R ρ = b of Eq. 9) for nodes r, element-wise over arrays.

    Closed form (no linear-algebra call, so it vectorises over steps on the host and over samples on the
    device without host reads): ρ_i = Σ_m [x^{m−1}] ℓ_i(x) · b_m, ℓ_i(x) = Π_{j≠i} (x − r_j)/(r_i − r_j) the
    Lagrange basis polynomial of node i.
    """
    rhos = []
    for i, r_i in enumerate(nodes):
        coef: list[Any] = [1.0]  # monomial coefficients of ℓ_i, lowest degree first
        for j, r_j in enumerate(nodes):
            if j != i:
                coef = [(lo - r_j * hi) / (r_i - r_j) for lo, hi in zip([0.0, *coef], [*coef, 0.0])]
        rhos.append(sum(c * b for c, b in zip(coef, rhs)))
    return rhos


def unipc_local(
    xp: Any,
    order: int,
    lam: Sequence[Any],
    alpha: Sequence[Any],
    sigma: Sequence[Any],
    variant: str,
    corrector: bool,
) -> tuple[Any, tuple[Any, ...]]:
    """Coefficients of one UniP-p (``corrector=False``) or UniC-p update, p = ``order``, from its points.

    ``lam``/``alpha``/``sigma`` hold λ, α, σ at the target t first, then the start s, then s − 1, …, s − p + 1
    (arrays of namespace ``xp``, computed element-wise). Returns (weight of x_s, weights of the x̂0): the
    predictor's weights are those of m_s, m_{s−1}, …, m_{s−p+1}; the corrector's start with that of m_t,
    the prediction at the target.
    """
    with np.errstate(all="ignore"):
        a_t = alpha[0]
        c_x = sigma[0] / sigma[1]
        h = lam[0] - lam[1]
        hh = -h
        h_phi_1 = xp.expm1(hh)
        w_s = -a_t * h_phi_1
        if order == 1 and not corrector:  # also the step into σ = 0 (h = ∞), where it returns x̂0
            return c_x, (w_s,)
        b_h = hh if variant == "bh1" else xp.expm1(hh)
        rks = [(lam[1 + i] - lam[1]) / h for i in range(1, order)] + [1.0]
        b = []
        g, factorial = h_phi_1 / hh - 1.0, 1.0
        for i in range(1, order + 1):
            b.append(g * factorial / b_h)
            factorial *= i + 1
            g = g / hh - 1.0 / factorial
        if corrector:
            rhos = [0.5] if order == 1 else _solve_vandermonde(rks, b)
        else:
            rhos = [0.5] if order == 2 else _solve_vandermonde(rks[:-1], b[:-1])
        previous = []
        for i in range(1, order):  # − α_t B ρ_i (m_{s−i} − m_s)/r_i
            w = -a_t * b_h * rhos[i - 1] / rks[i - 1]
            previous.append(w)
            w_s = w_s - w
        if not corrector:
            return c_x, (w_s, *previous)
        w_t = -a_t * b_h * rhos[-1]  # − α_t B ρ_p (m_t − m_s)
        return c_x, (w_t, w_s - w_t, *previous)


def unipc_weights(
    lam: np.ndarray,
    alpha: np.ndarray,
    sigma: np.ndarray,
    s: int,
    t: int,
    order: int,
    variant: str,
    corrector: bool,
) -> tuple[float, list[float], float]:
    """Coefficients of one UniP (``corrector=False``) or UniC update from grid point ``s`` to ``t``.

    Returns (weight of x_s, weights of x̂0 at s, s − 1, …, s − order + 1, weight of x̂0 at t); the last is 0
    for the predictor. ``lam``/``alpha``/``sigma`` are λ, α, σ on the grid (float64); the formula is
    :func:`unipc_local`'s.
    """
    if math.isinf(lam[t] - lam[s]) and (order != 1 or corrector):
        raise ValueError("a UniPC step into sigma = 0 must be a first-order predictor step")
    idx = [t, *(s - i for i in range(order))]
    c_x, weights = unipc_local(np, order, lam[idx], alpha[idx], sigma[idx], variant, corrector)
    weights = [float(w) for w in weights]
    w_t = weights.pop(0) if corrector else 0.0
    return float(c_x), weights, w_t


class UniPC(Solver):
    """UniPC multistep with the B(h) predictor and corrector (data prediction), orders 1–3.

    Args:
        order: p of UniP-p / UniC-p (1, 2 or 3); the corrector raises the accuracy order to p + 1.
        variant: ``"bh1"`` (B(h) = h; the paper's choice for unconditional sampling at < 10 steps) or
            ``"bh2"`` (B(h) = e^h − 1; guided sampling).
        lower_order_final: order min(p, N − k) at step k (diffusers' UniPC lowers at every step count).
        disable_corrector: indices of predictor steps whose result is not corrected (diffusers' key; the DC
            paper's SD configuration uses ``(0,)``).
        use_corrector: ``False`` runs UniP alone (a predictor-only solver).
        thresholding: dynamic thresholding of x̂0 (pixel-space models only).
    """

    def __init__(
        self,
        order: int = 2,
        variant: Literal["bh1", "bh2"] = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Iterable[int] = (),
        use_corrector: bool = True,
        thresholding: DynamicThresholding | None = None,
    ):
        super().__init__(x0_transform=thresholding)
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown UniPC variant {variant!r}: expected 'bh1' or 'bh2'")
        disabled = tuple(sorted({int(i) for i in disable_corrector}))
        if any(i < 0 for i in disabled):
            raise ValueError(f"disable_corrector holds step indices (>= 0), got {list(disabled)}")
        self.order = int(order)
        self.variant = variant
        self.lower_order_final = bool(lower_order_final)
        self.disable_corrector = disabled
        self.use_corrector = bool(use_corrector)
        self.name = f"unipc{order}-{variant}" if use_corrector else f"unip{order}-{variant}"

    def step_orders(self, num_steps: int, final_sigma: float) -> list[int]:
        """The predictor order of each of ``num_steps`` updates."""
        orders = []
        for k in range(num_steps):
            q = min(self.order, k + 1)
            if self.lower_order_final:
                q = min(q, num_steps - k)
            if k == num_steps - 1 and final_sigma == 0.0:
                q = 1
            orders.append(q)
        return orders

    def corrects(self, k: int) -> bool:
        """Whether step k corrects the sample predicted by step k − 1."""
        return self.use_corrector and k >= 1 and (k - 1) not in self.disable_corrector

    def local_coefficients(
        self, xp: Any, order: int, lam: Sequence[Any], alpha: Sequence[Any], sigma: Sequence[Any]
    ) -> LocalCoefficients:
        """The UniP predictor of ``order`` (:func:`unipc_local`): deterministic, no noise term."""
        c_x, weights = unipc_local(xp, order, lam, alpha, sigma, self.variant, corrector=False)
        return c_x, weights, xp.zeros_like(c_x)

    def local_corrector(
        self, xp: Any, order: int, lam: Sequence[Any], alpha: Sequence[Any], sigma: Sequence[Any]
    ) -> LocalCorrector:
        """The UniC corrector of ``order`` (:func:`unipc_local`); its anchor is the previous step's start sample."""
        return unipc_local(xp, order, lam, alpha, sigma, self.variant, corrector=True)

    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        n = sigmas.size - 1
        orders = self.step_orders(n, float(sigmas[-1]))
        pts = step_points(*marginals(process, sigmas), depth=self.order + 1)
        predictors = {q: self.local_coefficients(np, q, *pts) for q in range(1, self.order + 1)}
        # Step k's corrector is the UniC update from point k − 1 to k: the step's points without its target.
        correctors = {q: self.local_corrector(np, q, *(p[1:] for p in pts)) for q in range(1, self.order + 1)}

        def build(k: int, available: int | None = None) -> LinearStep:
            """Step k's update when only ``available`` predictions are stored (None: all it plans for)."""
            q = orders[k] if available is None else min(orders[k], available)
            c_x, weights, _ = predictors[q]
            corrector = None
            if self.corrects(k) and (available is None or available >= 2):
                qc = orders[k - 1] if available is None else min(orders[k - 1], available - 1)
                c_a, w_corr = correctors[qc]
                corrector = LinearStep(
                    x=0.0, anchor=float(c_a[k]), history=tuple(float(w[k]) for w in w_corr), order=qc
                )
            return LinearStep(
                x=float(c_x[k]),
                history=tuple(float(w[k]) for w in weights),
                save_anchor=True,
                order=q,
                corrector=corrector,
            )

        steps = []
        for k in range(n):
            full = build(k)
            lower = tuple(build(k, m) for m in range(1, full.history_needed))
            steps.append(replace(full, lower=lower))
        return np.asarray(sigmas[:-1], dtype=np.float64), steps, self.order + 1
