"""What every solver shares: a host-side plan of coefficients and a device-side linear update.

Every solver in this package — DDIM, Euler, DPM-Solver++ multistep/singlestep, their SDE variants, UniPC and
DC-Solver — is a *linear* method: the next sample is a fixed linear combination of the current sample, the
stored x̂0 predictions and fresh Gaussian noise,

    x_{k+1} = c_x·x_k + c_a·x_anchor + Σ_j c_j·x̂0_{k−j} + c_z·z,

with coefficients that depend only on the schedule. :meth:`Solver.plan` computes all of them once, on the
host in float64; :meth:`Solver.step` then issues a handful of fused tensor ops per model evaluation, with
no host–device synchronisation and no branch on a device value. The solver's state (the x̂0 history and an
anchor sample) is explicit and can be re-indexed along the batch, which particle resampling needs.

A step runs in two halves, both linear:

1. :meth:`Solver.correct` stores the new x̂0 and, for predictor–corrector methods (UniPC), replaces the
   sample by a *corrected* one, x_k ← a·x_anchor + Σ_j b_j·x̂0_{k−j} (the new x̂0 included, so the
   correction costs no extra model call), which becomes the next anchor;
2. :meth:`Solver.advance` optionally replaces the newest x̂0 by a fixed combination of the newest ones
   (DC-Solver's dynamic compensation, ``compensation``) and applies the update above.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..denoiser import compute_dtype
from ..noise import NoiseProcess
from ..schedules.schedule import Schedule
from .final_step import FinalStep, check_final_step, replace_final_step

__all__ = [
    "LinearStep",
    "LocalCoefficients",
    "LocalCorrector",
    "SolverPlan",
    "SolverState",
    "Solver",
    "marginals",
    "step_points",
]


@dataclass(frozen=True)
class LinearStep:
    """Coefficients of one update (host floats).

    ``history[j]`` multiplies the j-th newest x̂0 (``history[0]`` is the one just computed); ``anchor``
    multiplies the sample saved by the last step with ``save_anchor`` (the start of a singlestep outer step).
    ``lower[m − 1]`` is the same update using only the m newest predictions, for a run that starts in the
    middle of the schedule (img2img) and so has less history than planned.

    ``corrector``, if set, is applied first: the sample becomes ``corrector.x·x + corrector.anchor·anchor +
    Σ_j corrector.history[j]·x̂0_{k−j}`` (``history[0]`` being the x̂0 just computed), and it is that corrected
    sample which ``save_anchor`` stores and the update uses. ``compensation``, if set, then replaces the
    newest stored x̂0 by ``Σ_i compensation[i]·x̂0_{k−i}`` (it stays replaced for later steps).
    """

    x: float
    history: tuple[float, ...] = ()
    anchor: float = 0.0
    noise: float = 0.0
    save_anchor: bool = False
    order: int = 1
    lower: tuple[LinearStep, ...] = ()
    corrector: LinearStep | None = None
    compensation: tuple[float, ...] = ()

    @property
    def history_needed(self) -> int:
        """How many stored predictions (the new one included) this step reads."""
        corr = 0 if self.corrector is None else len(self.corrector.history)
        return max(len(self.history), corr, len(self.compensation))


#: (c_x, history weights newest first, noise weight) of one update, as arrays of any namespace.
LocalCoefficients = tuple[Any, tuple[Any, ...], Any]

#: (anchor weight, history weights newest first — the new x̂0 included) of one corrector, as arrays.
LocalCorrector = tuple[Any, tuple[Any, ...]]


@dataclass(frozen=True)
class SolverPlan:
    """Everything a sampling loop needs, computed once per schedule.

    ``sigmas`` holds σ̃ at the K evaluation points plus the final level (K + 1 values); ``alpha_t`` and
    ``sigma_t`` are the marginal coefficients at the same points, ``timesteps`` what the network receives
    at the K evaluation points, ``steps`` the K updates.
    """

    process: NoiseProcess
    sigmas: np.ndarray
    alpha_t: np.ndarray
    sigma_t: np.ndarray
    timesteps: np.ndarray
    steps: tuple[LinearStep, ...]
    history_size: int

    @property
    def num_evals(self) -> int:
        """Model evaluations (NFE) of one pass."""
        return len(self.steps)

    @property
    def stochastic(self) -> bool:
        return any(s.noise != 0.0 for s in self.steps)

    @property
    def orders(self) -> list[int]:
        return [s.order for s in self.steps]

    @property
    def init_noise_sigma(self) -> float:
        return self.process.init_noise_sigma(float(self.sigmas[0]))


@dataclass
class SolverState:
    """Mutable per-run state: the newest x̂0 predictions (oldest first) and the anchor sample."""

    history: list[torch.Tensor] = field(default_factory=list)
    anchor: torch.Tensor | None = None

    def push(self, x0: torch.Tensor, size: int) -> None:
        self.history.append(x0)
        if len(self.history) > size:
            del self.history[0]

    def copy(self) -> SolverState:
        """A shallow copy: its own history list, the same tensors (steps never modify them in place)."""
        return SolverState(history=list(self.history), anchor=self.anchor)

    def index_select(self, index: torch.Tensor) -> SolverState:
        """The state of the samples ``index`` (e.g. resampled particles' ancestors), gathered along dim 0."""
        return SolverState(
            history=[h.index_select(0, index) for h in self.history],
            anchor=None if self.anchor is None else self.anchor.index_select(0, index),
        )


def _weighted_sum(terms: Sequence[tuple[float | torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ w·t for host-float weights (fused in-place adds) or tensor weights (out of place, differentiable)."""
    out: torch.Tensor | None = None
    for w, t in terms:
        if isinstance(w, torch.Tensor):
            out = w * t if out is None else out + w * t
        elif out is None:
            out = t * w
        elif w != 0.0:
            if out.requires_grad or t.requires_grad:
                out = out + t * w
            else:
                out.add_(t, alpha=w)
    assert out is not None
    return out


def _combine(x: torch.Tensor, c: LinearStep, state: SolverState) -> torch.Tensor:
    """c.x·x + Σ_j c.history[j]·x̂0_{k−j} + c.anchor·anchor (a new tensor; the inputs are not modified)."""
    history = state.history
    terms: list[tuple[float | torch.Tensor, torch.Tensor]] = []
    if c.x != 0.0 or not (c.anchor != 0.0 or any(c.history)):
        terms.append((c.x, x))
    terms += [(coef, history[-1 - j]) for j, coef in enumerate(c.history) if coef != 0.0]
    if c.anchor != 0.0:
        if state.anchor is None:
            raise ValueError("this step needs the anchor sample of an earlier step, and there is none")
        terms.append((c.anchor, state.anchor))
    return _weighted_sum(terms)


def marginals(process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(λ, α, σ) at the noise levels σ̃; σ̃ = 0 gives λ = +∞, α = 1, σ = 0."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lam = -np.log(sigmas)
    alpha, sigma = process.alpha_sigma(sigmas)
    return lam, alpha, sigma


def step_points(
    lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, depth: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The points of every step of a grid as :meth:`Solver.local_coefficients` reads them, vectorised over steps.

    For (λ, α, σ) at the K + 1 grid points, entry 0 of each returned tuple holds the values at the steps'
    targets k + 1, entry 1 at their current points k and entry j ≥ 2 at the earlier points k + 1 − j (NaN
    where that is before the first point), for j = 0 … ``depth``; each array has one value per step.
    """
    n = lam.size - 1

    def at(values: np.ndarray, j: int) -> np.ndarray:
        out = np.full(n, np.nan)
        start = max(j - 1, 0)
        if start < n:
            out[start:] = values[start + 1 - j : n + 1 - j]
        return out

    lams, alphas, sigmas = (tuple(at(v, j) for j in range(depth + 1)) for v in (lam, alpha, sigma))
    return lams, alphas, sigmas


class Solver(ABC):
    """A sampler for the probability-flow ODE / reverse SDE, written as a sequence of linear updates."""

    #: Short name used by the CLI and in tables.
    name: str = "solver"

    _PLAN_CACHE_SIZE = 16

    #: How the last step to σ̃ = 0 is taken (:mod:`diffsamplers.solvers.final_step`); see :meth:`with_final_step`.
    final_step: FinalStep = "solver"

    def __init__(self, x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.x0_transform = x0_transform
        self._plans: dict[tuple, tuple[NoiseProcess, SolverPlan]] = {}

    def with_final_step(self, final_step: FinalStep) -> Solver:
        """A copy of this solver whose last step to σ̃ = 0 is ``final_step``: ``"solver"`` (its own update),
        ``"midpoint"`` (the ODE's limit ½(y + x̂0), :mod:`diffsamplers.solvers.final_step`) or a κ in [0, 1)."""
        out = copy.copy(self)
        out.final_step = check_final_step(final_step)
        out._plans = {}
        return out

    # -- host side ------------------------------------------------------------------------------
    def plan(self, process: NoiseProcess, schedule: Schedule) -> SolverPlan:
        """Precompute every coefficient for ``schedule`` (float64, on the host).

        Plans are cached per (process, schedule); a solver's settings must not change after construction.
        """
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        key = (
            id(process),
            schedule.sigmas.tobytes(),
            None if schedule.timesteps is None else schedule.timesteps.tobytes(),
        )
        cached = self._plans.get(key)
        if cached is not None and cached[0] is process:
            return cached[1]
        plan = self._make_plan(process, schedule)
        if len(self._plans) >= self._PLAN_CACHE_SIZE:
            del self._plans[next(iter(self._plans))]
        self._plans[key] = (process, plan)
        return plan

    def _make_plan(self, process: NoiseProcess, schedule: Schedule) -> SolverPlan:
        schedule.check_range(process)
        eval_sigmas, steps, history_size = self.coefficients(process, schedule.sigmas)
        sigmas = np.concatenate([eval_sigmas, schedule.sigmas[-1:]])
        if self.final_step != "solver":
            steps = replace_final_step(list(steps), marginals(process, sigmas)[1], sigmas, self.final_step)
        if np.array_equal(eval_sigmas, schedule.sigmas[:-1]):
            timesteps = schedule.model_timesteps(process)
        else:
            Schedule(sigmas).check_range(process)
            timesteps = process.timestep_from_sigma_tilde(eval_sigmas)
        _, alpha, sigma = marginals(process, sigmas)
        return SolverPlan(process, sigmas, alpha, sigma, np.asarray(timesteps, np.float64), tuple(steps), history_size)

    @abstractmethod
    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        """(σ̃ at the evaluation points, one :class:`LinearStep` per evaluation, history length)."""

    # -- per-sample grids (optional) --------------------------------------------------------------
    def local_coefficients(
        self, xp: Any, order: int, lam: Sequence[Any], alpha: Sequence[Any], sigma: Sequence[Any]
    ) -> LocalCoefficients:
        """The update's coefficients from the points it involves, for arrays of namespace ``xp``.

        ``lam``, ``alpha`` and ``sigma`` hold λ, α, σ at the target point first, then the current point, then
        earlier evaluation points (as many as ``order`` needs); entries are NumPy arrays (the host plan,
        vectorised over steps) or torch tensors (one value per sample, on the device). Returns
        ``(c_x, (c_0, c_1, …), c_noise)`` for ``x_next = c_x·x + Σ_j c_j·x̂0_{−j} + c_noise·z``. A solver
        whose plan is built from this one formula can run on per-sample grids (the exposure-bias time shift,
        :mod:`diffsamplers.solvers.exposure_bias_time_shift`); others raise ``NotImplementedError``.

        The other halves of a :class:`LinearStep` have their own rules, used where the plan has them: a
        planned ``corrector`` comes from :meth:`local_corrector`, a planned ``compensation`` from
        :meth:`local_compensation`. The step's structure (its ``order``, its corrector's order, whether it
        compensates) is the host plan's; only the values of the points differ per sample.
        """
        raise NotImplementedError(f"{self.name} has no per-sample (local) coefficient rule")

    def local_corrector(
        self, xp: Any, order: int, lam: Sequence[Any], alpha: Sequence[Any], sigma: Sequence[Any]
    ) -> LocalCorrector:
        """A planned corrector's coefficients from the points it involves (see :meth:`local_coefficients`).

        The points are the corrected update's: its target (the current point of the step), its start (the
        previous point, whose sample is the anchor), then earlier points. Returns ``(c_anchor, (c_0, c_1, …))``
        for ``x ← c_anchor·x_anchor + Σ_j c_j·x̂0_{−j}``, ``c_0`` weighting the x̂0 just computed.
        """
        raise NotImplementedError(f"{self.name} has no per-sample (local) corrector rule")

    def local_compensation(self, xp: Any, index: int, times: Sequence[Any]) -> tuple[Any, ...]:
        """The weights of a planned ``compensation`` of step ``index`` from the process times of the newest
        evaluation points (``times[0]`` the current one, then earlier ones; as many as the plan's weights)."""
        raise NotImplementedError(f"{self.name} has no per-sample (local) compensation rule")

    @property
    def supports_local_coefficients(self) -> bool:
        return type(self).local_coefficients is not Solver.local_coefficients

    def evaluation_point(self, plan: SolverPlan, state: SolverState, index: int) -> tuple[Any, Any, Any] | None:
        """Per-sample (timestep, α, σ) of evaluation ``index`` if this solver moved samples off the plan's grid.

        ``None`` (the default) means the plan's own values; the loop and the diffusers adapter then use
        them unchanged.
        """
        return None

    # -- device side ----------------------------------------------------------------------------
    def init_state(self) -> SolverState:
        return SolverState()

    def step(
        self,
        plan: SolverPlan,
        state: SolverState,
        index: int,
        x: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Advance from evaluation point ``index`` (sample ``x``, prediction ``x0``) to the next one:
        :meth:`correct`, then :meth:`advance` — for every solver.

        Arithmetic runs in float32 (float64 inputs stay float64) whatever the model dtype; the result is
        in that dtype.
        """
        c, x = self.correct(plan, state, index, x, x0)
        return self.advance(plan, state, index, c, x, noise)

    def correct(
        self, plan: SolverPlan, state: SolverState, index: int, x: torch.Tensor, x0: torch.Tensor
    ) -> tuple[LinearStep, torch.Tensor]:
        """First half of :meth:`step`: store ``x0``, apply the corrector if the step has one, save the anchor.

        Returns the step's coefficients (lowered to the history available) and the (corrected) sample.
        """
        c = plan.steps[index]
        work = compute_dtype(x.dtype)
        if x.dtype != work:
            x = x.to(work)
        if x0.dtype != work:
            x0 = x0.to(work)
        if self.x0_transform is not None:
            x0 = self.x0_transform(x0)
        state.push(x0, plan.history_size)
        if len(state.history) < c.history_needed:
            if len(state.history) > len(c.lower):
                raise ValueError(f"{self.name} cannot start at step {index}: it needs the history of earlier steps")
            c = c.lower[len(state.history) - 1]
        if c.corrector is not None:
            x = _combine(x, c.corrector, state)
        if c.save_anchor:
            state.anchor = x
        return c, x

    def advance(
        self,
        plan: SolverPlan,
        state: SolverState,
        index: int,
        c: LinearStep,
        x: torch.Tensor,
        noise: torch.Tensor | None = None,
        compensation: Sequence[float | torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Second half of :meth:`step`: compensate the newest x̂0 if planned, then apply the update ``c``.

        ``compensation`` overrides the planned weights (DC-Solver's ratio search passes weights that are
        differentiable functions of a ratio); an empty sequence turns compensation off.
        """
        weights = c.compensation if compensation is None else tuple(compensation)
        if weights:
            history = state.history
            newest = len(history) - 1
            compensated = _weighted_sum([(w, history[newest - i]) for i, w in enumerate(weights)])
            history[newest] = compensated
        out = _combine(x, c, state)
        if c.noise != 0.0:
            if noise is None:
                raise ValueError(f"step {index} of {self.name} is stochastic and needs a noise tensor")
            out.add_(noise.to(out.dtype), alpha=c.noise)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
