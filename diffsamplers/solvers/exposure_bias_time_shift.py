"""The exposure-bias time-shift sampler (TS-DPM): per sample, move the next grid point to the time whose noise
level matches the sample.

Li, Qu, Yao, Sun & Moens 2024, "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted
Time Steps" (ICLR 2024, arXiv:2305.15583; code Mingxiao-Li/TS-DPM). Not to be confused with diffusers'
flow-matching "time shift" (``shift``/``mu``, a resolution-dependent re-spacing of the whole schedule).

During sampling the network meets samples x̂_t that drift from the training marginal of their nominal time
t (exposure bias). Theorem 3.1 of the paper: the time that couples best with x̂_t has σ²_{t_s} ≈ Var(x̂_t)
(up to a term negligible for images). The practical rule of the official code, kept here, is, per sample b:

    t_s,b = argmin_{τ ∈ window} | v_b − σ_τ² |,   v_b = unbiased variance of all C·H·W values of x_b,

over the training timesteps τ within ``half_width`` steps of the nominal next grid point, only while the
nominal next timestep exceeds ``cutoff`` and not on the first update (it needs a generated sample).

The official integrations wire the chosen time differently (the DDIM/ADM scripts only re-time the model call,
the DPM-Solver one moves the grid point); this module follows
the DPM-Solver integration ("variant C"): t_s *replaces* the next grid point for that sample — the update
lands there, the network is evaluated there, and later multistep updates use it in their step sizes. The
base solver provides the update as a function of the points it involves
(:meth:`~diffsamplers.solvers.base.Solver.local_coefficients`, the same formula that builds its host plan),
so any solver with that rule composes with the shift — DDIM, DPM-Solver++ (ODE/SDE, orders 1–3), UniPC and
DC-Solver here. A step is applied as the base solver's :class:`~diffsamplers.solvers.base.LinearStep` would
be, with per-sample values: UniPC's corrector (``local_corrector``, the UniC update from the previous point
to the current one, anchored at the previous step's start sample) and DC-Solver's dynamic compensation
(``local_compensation``, Lagrange weights in the process times of the sample's own points) included. The
variance rule reads the sample the network has just been evaluated at (for UniPC, the uncorrected one).

No host–device synchronisation: the candidate times of every shifted step are known on the host when the
plan is built; their (λ, α, σ, timestep, σ²) tables are uploaded once in float64, and the choice is a
masked ``argmin`` and a gather on the device. The update's coefficients are then computed per sample on
the device (float64) and the update itself runs in float32. Steps that involve no shifted point use the
base solver's precomputed plan unchanged.

Options beyond the paper: ``variance_source="epsilon"`` uses the variance of the noise prediction, as the
official DPM-Solver integration does; ``signal_variance=c`` matches v_b against α_τ² c + σ_τ² — the
expected variance of a sample whose clean part has per-pixel variance c (the paper's rule is c = 0, which
biases the choice towards noisier times).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch

from ..denoiser import compute_dtype
from ..noise import DiscreteVP, NoiseProcess
from ..schedules.schedule import Schedule
from .base import LinearStep, Solver, SolverPlan, SolverState, marginals

__all__ = ["ExposureBiasTimeShift", "TimeShiftPlan", "TimeShiftState"]

VarianceSource = Literal["x", "epsilon"]


@dataclass(frozen=True)
class _Window:
    """Host float64 tables of one shifted step's candidate points (the nominal point first)."""

    timesteps: np.ndarray
    time: np.ndarray
    lam: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    target_variance: np.ndarray


@dataclass(frozen=True)
class TimeShiftPlan(SolverPlan):
    """The base solver's plan plus, per step, whether it shifts and the candidate tables."""

    base: SolverPlan | None = None
    lam: np.ndarray | None = None  # nominal λ at the K + 1 points
    time: np.ndarray | None = None  # nominal process time t at the K + 1 points (NaN at the final level)
    shifts: tuple[bool, ...] = ()  # step k picks point k + 1 per sample
    per_sample: tuple[bool, ...] = ()  # step k needs per-sample coefficients
    windows: tuple[_Window | None, ...] = ()
    integral_timesteps: bool = True
    _device_tables: dict = field(default_factory=dict, compare=False, repr=False)

    def device_windows(self, device: torch.device) -> tuple[dict[str, torch.Tensor] | None, ...]:
        """The candidate tables on ``device`` (uploaded once; float64 unless the device lacks it)."""
        tables = self._device_tables.get(device)
        if tables is None:
            dtype = _table_dtype(device)
            ts_dtype = torch.int64 if self.integral_timesteps else torch.float32
            tables = tuple(
                None
                if w is None
                else {
                    "timesteps": torch.as_tensor(w.timesteps, dtype=ts_dtype).to(device),
                    **{
                        k: torch.as_tensor(getattr(w, k), dtype=dtype).to(device)
                        for k in ("time", "lam", "alpha", "sigma", "target_variance")
                    },
                }
                for w in self.windows
            )
            self._device_tables[device] = tables
        return tables


@dataclass
class _Point:
    """One grid point's per-sample values (tensors of shape (B,)): λ, α, σ, model timestep, process time."""

    lam: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    timestep: torch.Tensor
    time: torch.Tensor

    def index_select(self, index: torch.Tensor) -> _Point:
        return _Point(*(getattr(self, f.name).index_select(0, index) for f in fields(self)))


@dataclass
class TimeShiftState(SolverState):
    """The base state plus the per-sample values of the shifted points, keyed by point index."""

    points: dict[int, _Point] = field(default_factory=dict)
    sample_ndim: int = 4
    work_dtype: torch.dtype = torch.float32

    def copy(self) -> TimeShiftState:
        return TimeShiftState(
            history=list(self.history),
            anchor=self.anchor,
            points=dict(self.points),
            sample_ndim=self.sample_ndim,
            work_dtype=self.work_dtype,
        )

    def index_select(self, index: torch.Tensor) -> TimeShiftState:
        base = super().index_select(index)
        return TimeShiftState(
            history=base.history,
            anchor=base.anchor,
            points={k: p.index_select(index) for k, p in self.points.items()},
            sample_ndim=self.sample_ndim,
            work_dtype=self.work_dtype,
        )


def _candidate_timesteps(process: NoiseProcess, num_candidates: int) -> np.ndarray:
    """Increasing candidate model timesteps: the training steps of a discrete model, else a uniform time grid."""
    if isinstance(process, DiscreteVP):
        return np.arange(process.num_train_timesteps, dtype=np.float64)
    t = np.linspace(process.t_min, process.t_max, num_candidates)
    return process.timestep(t)


class ExposureBiasTimeShift(Solver):
    """Time-shift sampling (Li et al. 2024) around any solver with a local coefficient rule.

    Args:
        base: the solver to shift, e.g. ``DDIM()``, ``DPMSolverPlusPlus(2)``, ``UniPC(3, "bh1")`` or
            ``DCSolver(ratios)``.
        half_width: candidates are the training timesteps τ with |τ − t_next| ≤ ``half_width`` (in training
            steps, or in candidate-grid steps for continuous-time models). The official scripts' ``window_size``
            w corresponds to ``half_width = w // 2`` (:meth:`from_window_size`). 0 disables the shift.
        cutoff: shift only while the nominal next timestep (model units, e.g. 0–999) is above this value.
        variance_source: ``"x"`` (the sample, the paper's rule) or ``"epsilon"`` (the noise prediction, as the
            official DPM-Solver integration).
        signal_variance: c in the matched level α_τ² c + σ_τ² (0: the paper's σ_τ²).
        start_step: first update that may shift (1: after the first, as the official code).
        num_candidates: size of the uniform candidate grid for continuous-time models.
    """

    def __init__(
        self,
        base: Solver,
        half_width: int = 10,
        cutoff: float = 300.0,
        variance_source: VarianceSource = "x",
        signal_variance: float = 0.0,
        start_step: int = 1,
        num_candidates: int = 1000,
    ):
        super().__init__()
        if not isinstance(base, Solver):
            raise TypeError(f"base must be a Solver, got {type(base).__name__}")
        if isinstance(base, ExposureBiasTimeShift):
            raise TypeError("the base solver is already time-shifted")
        if not base.supports_local_coefficients:
            raise TypeError(
                f"{base.name} has no per-sample coefficient rule (Solver.local_coefficients), so it cannot be "
                "time-shifted; DDIM, DPMSolverPlusPlus, UniPC and DCSolver can"
            )
        if isinstance(half_width, bool) or int(half_width) != half_width or half_width < 0:
            raise ValueError(f"half_width must be a non-negative integer, got {half_width!r}")
        if variance_source not in ("x", "epsilon"):
            raise ValueError(f"unknown variance_source {variance_source!r}: expected 'x' or 'epsilon'")
        if not math.isfinite(signal_variance) or signal_variance < 0:
            raise ValueError(f"signal_variance must be finite and non-negative, got {signal_variance}")
        if not math.isfinite(float(cutoff)):
            raise ValueError(f"cutoff must be finite, got {cutoff}")
        if int(start_step) < 0 or int(num_candidates) < 2:
            raise ValueError(f"need start_step >= 0 and num_candidates >= 2, got {start_step}, {num_candidates}")
        self.base = base
        self.x0_transform = base.x0_transform
        self.half_width = int(half_width)
        self.cutoff = float(cutoff)
        self.variance_source = variance_source
        self.signal_variance = float(signal_variance)
        self.start_step = int(start_step)
        self.num_candidates = int(num_candidates)
        self.name = f"{base.name}+ts(w={self.half_width},c={self.cutoff:g})"

    @classmethod
    def from_window_size(cls, base: Solver, window_size: int, cutoff: float, **kwargs: Any) -> ExposureBiasTimeShift:
        """The official scripts' convention: ``--window_size w`` searches w // 2 steps on each side."""
        return cls(base, half_width=int(window_size) // 2, cutoff=cutoff, **kwargs)

    # -- host side ------------------------------------------------------------------------------
    def with_final_step(self, final_step: Any) -> Solver:
        """Refused: the time shift recomputes every update per sample from the solver's formula."""
        raise TypeError(
            "the exposure-bias time shift recomputes each update per sample: set final_step on plain solvers only"
        )

    def coefficients(self, process: NoiseProcess, sigmas: np.ndarray) -> tuple[np.ndarray, list[LinearStep], int]:
        return self.base.coefficients(process, sigmas)

    def _make_plan(self, process: NoiseProcess, schedule: Schedule) -> TimeShiftPlan:
        base = self.base.plan(process, schedule)
        if not np.array_equal(base.sigmas, schedule.sigmas):
            raise TypeError(f"{self.base.name} evaluates off the schedule's grid; it cannot be time-shifted")
        n = base.num_evals
        lam, _, _ = marginals(process, base.sigmas)
        time = np.append(process.t_from_sigma_tilde(base.sigmas[:-1]), math.nan)  # the final level has no use
        candidates = _candidate_timesteps(process, self.num_candidates)
        position = np.arange(candidates.size, dtype=np.float64)
        shifts = [
            self.half_width > 0 and self.start_step <= k and k + 1 < n and base.timesteps[k + 1] > self.cutoff
            for k in range(n)
        ]
        windows: list[_Window | None] = []
        for k in range(n):
            if not shifts[k]:
                windows.append(None)
                continue
            nominal_ts = float(base.timesteps[k + 1])
            centre = float(np.interp(nominal_ts, candidates, position))
            inside = np.abs(position - centre) <= self.half_width + 1e-9
            ts = candidates[inside]
            t = process.t_from_timestep(ts)
            lam_c = process.lambda_(t)
            keep = (lam_c < lam[k + 2]) & (np.abs(ts - nominal_ts) > 1e-9)  # noisier than the point after
            ts = np.concatenate([[nominal_ts], ts[keep]])
            t_c = np.concatenate([[time[k + 1]], t[keep]])
            lam_c = np.concatenate([[lam[k + 1]], lam_c[keep]])
            alpha_c, sigma_c = process.alpha_sigma(np.exp(-lam_c))
            variance = alpha_c**2 * self.signal_variance + sigma_c**2
            windows.append(_Window(ts, t_c, lam_c, alpha_c, sigma_c, variance))
        # A step needs per-sample coefficients if it involves a shifted point: its target or the points whose
        # predictions it reads (predictor, corrector and compensation: k + 1 − history_needed … k).
        moved = [False] + [shifts[k - 1] for k in range(1, n + 1)]  # point j may be shifted
        per_sample = [
            any(moved[j] for j in range(max(0, k + 1 - base.steps[k].history_needed), k + 2)) for k in range(n)
        ]
        all_ts = np.concatenate([base.timesteps] + [w.timesteps for w in windows if w is not None])
        return TimeShiftPlan(
            process=process,
            sigmas=base.sigmas,
            alpha_t=base.alpha_t,
            sigma_t=base.sigma_t,
            timesteps=base.timesteps,
            steps=base.steps,
            history_size=base.history_size,
            base=base,
            lam=lam,
            time=time,
            shifts=tuple(shifts),
            per_sample=tuple(per_sample),
            windows=tuple(windows),
            integral_timesteps=bool(np.all(all_ts == np.round(all_ts))),
        )

    # -- device side ----------------------------------------------------------------------------
    def init_state(self) -> TimeShiftState:
        return TimeShiftState()

    def _point(self, plan: TimeShiftPlan, state: TimeShiftState, j: int, like: torch.Tensor) -> _Point:
        point = state.points.get(j)
        if point is not None:
            return point
        full = lambda v: torch.full_like(like, float(v))  # noqa: E731
        timestep = plan.timesteps[j] if j < plan.num_evals else math.nan  # the final level is never evaluated
        return _Point(
            full(plan.lam[j]), full(plan.alpha_t[j]), full(plan.sigma_t[j]), full(timestep), full(plan.time[j])
        )

    def evaluation_point(self, plan: SolverPlan, state: SolverState, index: int) -> tuple[Any, Any, Any] | None:
        """Per-sample (timestep, α, σ) at a shifted evaluation point, shaped for the denoiser."""
        point = state.points.get(index) if isinstance(state, TimeShiftState) else None
        if point is None:
            return None
        view = (-1,) + (1,) * (state.sample_ndim - 1)
        work = state.work_dtype
        return point.timestep, point.alpha.to(work).view(view), point.sigma.to(work).view(view)

    def _own(self, plan: SolverPlan, state: SolverState) -> tuple[TimeShiftPlan, TimeShiftState]:
        if not isinstance(plan, TimeShiftPlan) or not isinstance(state, TimeShiftState):
            raise TypeError(f"{self.name} needs its own plan and state (from .plan and .init_state)")
        return plan, state

    def _points(
        self, plan: TimeShiftPlan, state: TimeShiftState, index: int, c: LinearStep, like: torch.Tensor
    ) -> list[_Point]:
        """The points step ``index`` involves: its target, its current point, then earlier ones (newest first)."""
        return [self._point(plan, state, index + 1 - m, like) for m in range(0, c.history_needed + 1)]

    def correct(
        self, plan: SolverPlan, state: SolverState, index: int, x: torch.Tensor, x0: torch.Tensor
    ) -> tuple[LinearStep, torch.Tensor]:
        """Store x̂0, pick the sample's next point (on a shifted step) and apply the corrector, per sample."""
        plan, state = self._own(plan, state)
        if not plan.per_sample[index]:
            return self.base.correct(plan.base, state, index, x, x0)
        c = plan.steps[index]
        work = compute_dtype(x.dtype)
        x = x if x.dtype == work else x.to(work)
        x0 = x0 if x0.dtype == work else x0.to(work)
        state.sample_ndim, state.work_dtype = x.ndim, work
        raw_x0 = x0
        if self.x0_transform is not None:
            x0 = self.x0_transform(x0)
        state.push(x0, plan.history_size)
        if len(state.history) < c.history_needed:
            raise ValueError(f"{self.name} cannot start at step {index}: it needs the history of earlier steps")
        like = torch.zeros(x.shape[0], dtype=_table_dtype(x.device), device=x.device)
        if plan.shifts[index]:
            state.points[index + 1] = self._shifted_point(plan, state, index, x, raw_x0, like)
        if c.corrector is not None:
            if state.anchor is None:
                raise ValueError("this step needs the anchor sample of an earlier step, and there is none")
            points = self._points(plan, state, index, c, like)[1:]  # the corrected update ends at the current point
            lam, alpha, sigma = ([getattr(p, f) for p in points] for f in ("lam", "alpha", "sigma"))
            c_a, corr = self.base.local_corrector(torch, c.corrector.order, lam, alpha, sigma)
            x = _per_sample_sum([(c_a, state.anchor), *zip(corr, state.history[::-1])])
        if c.save_anchor:
            state.anchor = x
        return c, x

    def _shifted_point(
        self,
        plan: TimeShiftPlan,
        state: TimeShiftState,
        index: int,
        x: torch.Tensor,
        x0: torch.Tensor,
        like: torch.Tensor,
    ) -> _Point:
        """The paper's rule: the candidate whose noise level best matches the sample's variance."""
        current = self._point(plan, state, index, like)
        table = plan.device_windows(x.device)[index]
        if self.variance_source == "x":
            source = x
        else:  # the noise prediction ε̂ = (x − α x̂0)/σ
            view = (-1,) + (1,) * (x.ndim - 1)
            source = (x - current.alpha.to(x.dtype).view(view) * x0) / current.sigma.to(x.dtype).view(view)
        v = torch.var(source.flatten(1), dim=1).to(like.dtype)
        dist = (v[:, None] - table["target_variance"][None, :]).abs()
        # Only candidates strictly less noisy than the sample's current point keep its grid monotone.
        dist = dist.masked_fill(table["lam"][None, :] <= current.lam[:, None], math.inf)
        pick = dist.argmin(dim=1)
        return _Point(*(table[k][pick] for k in ("lam", "alpha", "sigma", "timesteps", "time")))

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
        """Compensate (DC-Solver) and update, per sample, with the coefficients of the sample's own points."""
        plan, state = self._own(plan, state)
        if not plan.per_sample[index]:
            return self.base.advance(plan.base, state, index, c, x, noise, compensation)
        like = torch.zeros(x.shape[0], dtype=_table_dtype(x.device), device=x.device)
        points = self._points(plan, state, index, c, like)
        lam, alpha, sigma, time = ([getattr(p, f) for p in points] for f in ("lam", "alpha", "sigma", "time"))
        history = state.history[::-1]  # newest first
        if compensation is not None or c.compensation:
            weights = (
                tuple(compensation)
                if compensation is not None
                else self.base.local_compensation(torch, index, time[1 : 1 + len(c.compensation)])
            )
            if weights:
                state.history[-1] = history[0] = _per_sample_sum(list(zip(weights, history)))
        c_x, coefs, c_z = self.base.local_coefficients(torch, c.order, lam, alpha, sigma)
        out = _per_sample_sum([(c_x, x), *zip(coefs, history)])
        if c.noise != 0.0:
            if noise is None:
                raise ValueError(f"step {index} of {self.name} is stochastic and needs a noise tensor")
            out = out + noise.to(out.dtype) * _per_sample(c_z, out)
        for j in [j for j in state.points if j < index + 2 - plan.history_size]:
            del state.points[j]  # no longer reachable by any update
        return out


def _per_sample(w: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A weight (host float, scalar or per-sample tensor) shaped to broadcast over ``like``'s samples."""
    w = torch.as_tensor(w, device=like.device)
    return w.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def _per_sample_sum(terms: list[tuple[float | torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ w·t with per-sample weights w (float64 on the device), in the tensors' dtype (a new tensor)."""
    (w0, t0), *rest = terms
    out = t0 * _per_sample(w0, t0)
    for w, t in rest:
        out = out + t * _per_sample(w, t)
    return out


def _table_dtype(device: torch.device) -> torch.dtype:
    """float64 for the per-sample tables and coefficients, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64
