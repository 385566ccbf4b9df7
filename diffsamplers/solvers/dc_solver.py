"""DC-Solver: dynamic compensation for predictor–corrector samplers (Zhao, Wang, Zhou & Lu 2024,
"DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation", ECCV 2024,
arXiv:2409.03755).

UniPC's corrector evaluates the model at the *predicted* sample but continues from the *corrected* one, so
the stored prediction m_i = x̂0(x̃_i, t_i) is misaligned with the trajectory (Sec. 3.2); classifier-free
guidance amplifies the mismatch. Dynamic compensation (Sec. 3.3, Eq. 11) replaces, before the predictor
leaves t_i, the newest stored prediction by the (K + 1)-point Lagrange polynomial through the last K + 1
predictions, evaluated at a shifted time

    m̂_i = Σ_{k=0}^{K} m_{i−k} Π_{l≠k} (τ_i − t_{i−l})/(t_{i−k} − t_{i−l}),   τ_i = t_{i−1} + ρ_i (t_i − t_{i−1}),

in (process) time units, not λ: the official code interpolates in the model's timestep (diffusers) or the
continuous time t (LDM), which are affinely related, and Lagrange interpolation is invariant under affine
maps. ρ_i = 1 gives τ_i = t_i and m̂_i = m_i: that step is then exactly the base solver's (it is skipped, not
recomputed). m̂_i stays in the buffer, so the corrector at t_{i+1} and later steps see it too. The first K
steps have fewer than K + 1 predictions and use ρ = 1; the paper's K = ``dc_order`` = 2.

The ratios ρ_i are searched per model/NFE/guidance scale (:mod:`diffsamplers.tuning.dc_search`) or predicted by
cascade polynomial regression (:mod:`diffsamplers.solvers.dc_cpr`). With fixed ratios the Lagrange weights are host
floats computed at plan time, and the compensation is K + 1 fused tensor ops per step.

Compensation also plugs into predictor-only multistep solvers (the paper's Table 6: DPM-Solver++, UniP):
``DCSolver(ratios, base=DPMSolverPlusPlus(2))`` applies the same replacement to their x̂0 history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import torch

from ..noise import NoiseProcess
from .base import LinearStep, LocalCoefficients, LocalCorrector, Solver, SolverPlan
from .unipc import UniPC

__all__ = ["DCSolver", "lagrange_weights", "compensation_times"]

Ratio = TypeVar("Ratio", float, torch.Tensor)

#: The official diffusers code caps the interpolation at 4 points.
MAX_DC_ORDER = 3


def lagrange_weights(ratio: Ratio, times: Sequence[Any]) -> list[Any]:
    """Weights of m_i, m_{i−1}, …, m_{i−K} in m̂_i (Eq. 11), for ``times`` = (t_i, t_{i−1}, …, t_{i−K}).

    ``ratio`` may be a host float or a tensor (the ratio search differentiates through the weights);
    ``times`` host floats, or arrays/tensors of times per sample (the exposure-bias time shift), element-wise.
    """
    t_new, t_prev = times[0], times[1]
    tau = t_prev + ratio * (t_new - t_prev)
    weights = []
    for i, t_i in enumerate(times):
        w = 1.0
        for j, t_j in enumerate(times):
            if j != i:
                w = w * ((tau - t_j) / (t_i - t_j))
        weights.append(w)
    return weights


def compensation_times(process: NoiseProcess, eval_sigmas: np.ndarray, index: int, dc_order: int) -> list[float]:
    """(t_i, t_{i−1}, …, t_{i−K}): the process times of the K + 1 newest evaluation points at step ``index``."""
    t = process.t_from_sigma_tilde(np.asarray(eval_sigmas[index - dc_order : index + 1], dtype=np.float64))
    return [float(v) for v in t[::-1]]


def check_ratios(ratios: Sequence[float], num_steps: int, dc_order: int, what: str = "DC-Solver") -> tuple[float, ...]:
    """Validate a ratio list for ``num_steps`` steps; raises ``ValueError`` naming the offending value."""
    values = tuple(float(r) for r in ratios)
    if len(values) != num_steps:
        raise ValueError(f"{what} has {len(values)} ratios but the schedule has {num_steps} steps (NFE {num_steps})")
    for i, r in enumerate(values):
        if not math.isfinite(r):
            raise ValueError(f"{what} ratio {i} is not finite: {r}")
        if i < dc_order and r != 1.0:
            raise ValueError(
                f"{what} ratio {i} = {r}: the first {dc_order} steps (dc_order) have too few predictions for "
                "compensation and must use 1"
            )
    return values


class DCSolver(Solver):
    """A multistep solver (UniPC by default) with DC-Solver's dynamic compensation.

    Args:
        ratios: one compensation ratio per step (NFE values; the first ``dc_order`` must be 1), or ``None``
            for all ones (the base solver exactly).
        base: the solver to compensate: :class:`UniPC` (default: order 2, bh2, as the official diffusers
            version) or a predictor-only multistep solver such as ``DPMSolverPlusPlus(2)``.
        dc_order: K, the Lagrange polynomial's degree (K + 1 points; the paper's default 2).
    """

    def __init__(self, ratios: Sequence[float] | None = None, base: Solver | None = None, dc_order: int = 2):
        base = UniPC(order=2, variant="bh2") if base is None else base
        if not isinstance(base, Solver) or isinstance(base, DCSolver):
            raise TypeError(f"base must be a (non-DC) Solver, got {type(base).__name__}")
        if isinstance(dc_order, bool) or not isinstance(dc_order, int) or not 1 <= dc_order <= MAX_DC_ORDER:
            raise ValueError(f"dc_order must be an integer from 1 to {MAX_DC_ORDER}, got {dc_order!r}")
        super().__init__(x0_transform=base.x0_transform)
        self.base = base
        self.dc_order = dc_order
        self.ratios = None if ratios is None else tuple(float(r) for r in ratios)
        if self.ratios is not None:
            check_ratios(self.ratios, len(self.ratios), dc_order)
        self.name = f"dc-{base.name}"

    def with_ratios(self, ratios: Sequence[float] | None) -> DCSolver:
        """The same solver (final step included) with other ratios."""
        out = DCSolver(ratios, self.base, self.dc_order)
        out.final_step = self.final_step
        return out

    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        eval_sigmas, steps, history_size = self.base.coefficients(process, sigmas)
        if any(s.anchor != 0.0 and s.corrector is None for s in steps):
            raise ValueError(
                f"dynamic compensation needs a multistep solver whose stored predictions lie on the schedule's "
                f"points; {self.base.name} is a singlestep method"
            )
        n = len(steps)
        ratios = (1.0,) * n if self.ratios is None else check_ratios(self.ratios, n, self.dc_order)
        out = []
        for k, (step, ratio) in enumerate(zip(steps, ratios)):
            if ratio != 1.0:
                weights = self.local_compensation(np, k, compensation_times(process, eval_sigmas, k, self.dc_order))
                lower = tuple(
                    replace(low, compensation=weights) if m + 1 >= len(weights) else low
                    for m, low in enumerate(step.lower)
                )
                step = replace(step, compensation=weights, lower=lower)
            out.append(step)
        return eval_sigmas, out, max(history_size, self.dc_order + 1)

    # -- per-sample grids: the base solver's rules, plus the compensation's -------------------------
    @property
    def supports_local_coefficients(self) -> bool:
        return self.base.supports_local_coefficients

    def local_coefficients(
        self, xp: Any, order: int, lam: Sequence[Any], alpha: Sequence[Any], sigma: Sequence[Any]
    ) -> LocalCoefficients:
        """The base solver's update (compensation only changes the stored x̂0 it reads)."""
        return self.base.local_coefficients(xp, order, lam, alpha, sigma)

    def local_corrector(
        self, xp: Any, order: int, lam: Sequence[Any], alpha: Sequence[Any], sigma: Sequence[Any]
    ) -> LocalCorrector:
        """The base solver's corrector."""
        return self.base.local_corrector(xp, order, lam, alpha, sigma)

    def local_compensation(self, xp: Any, index: int, times: Sequence[Any]) -> tuple[Any, ...]:
        """Eq. 11's Lagrange weights at step ``index`` for ``times`` = (t_i, …, t_{i−K}) (host floats or
        per-sample arrays); the empty tuple where the step's ratio is 1 (no compensation)."""
        ratio = 1.0 if self.ratios is None else self.ratios[index]
        return () if ratio == 1.0 else tuple(lagrange_weights(ratio, times))

    def compensation_times(self, plan: SolverPlan, index: int) -> list[float]:
        """(t_i, …, t_{i−K}) at step ``index`` of ``plan`` (for the ratio search's differentiable weights)."""
        if index < self.dc_order:
            raise ValueError(f"step {index} has fewer than dc_order + 1 = {self.dc_order + 1} predictions")
        return compensation_times(plan.process, plan.sigmas[:-1], index, self.dc_order)
