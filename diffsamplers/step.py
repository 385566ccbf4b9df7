"""The one sampling step: evaluate the model, let guidance act, correct, advance.

Every sampler in the package takes its steps through this module — the sampling loop
(:func:`diffsamplers.sampling.sample`), the reference solution (:mod:`diffsamplers.reference`), DC-Solver's ratio
search (which differentiates through it) and the diffusers scheduler adapters (which receive the model output
from the pipeline and start at :func:`correct`). A step at evaluation point k is

1. :func:`predict` — x̂0 = D(x_k, t_k, cond): each guidance's ``condition`` hook may first change the
   conditions and the classifier-free guidance scale; the model runs (with ∇ₓ available when a guidance
   asks for it, ``needs_grad``); each guidance's ``guide_x0`` hook may then change x̂0;
2. :func:`correct` — NaN/Inf bookkeeping, the callback, then the solver's first half
   (:meth:`~diffsamplers.solvers.base.Solver.correct`: store x̂0, UniC correction, anchor);
3. :func:`advance` — the solver's second half (:meth:`~diffsamplers.solvers.base.Solver.advance`: DC-Solver's
   compensation, the linear update, the step's noise), then each guidance's ``transition`` hook, which sees
   the update as a :class:`Move` it can replay from the same state (several candidates per sample) and may
   re-index the samples, the solver state and the conditions together (:meth:`SamplingRun.reindex`).

:class:`SamplingRun` holds what a batch carries from step to step. Nothing here reads a device value back to
the host: the NaN check writes one per-sample sum of x̂0 per step into a device buffer that is read once, at
the end (:class:`FiniteCheck`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .denoiser import Denoiser
from .rng import NoiseSource
from .solvers.base import LinearStep, Solver, SolverPlan, SolverState

__all__ = [
    "Conditions",
    "FiniteCheck",
    "Guidance",
    "Move",
    "NonFiniteError",
    "SamplingRun",
    "StepContext",
    "StepInfo",
    "advance",
    "as_guidance",
    "correct",
    "evaluation_point",
    "gather_conditions",
    "integrate",
    "normalised_time",
    "plan_timesteps",
    "predict",
    "step",
]

Cond = Mapping[str, Any] | None


class NonFiniteError(FloatingPointError):
    """The model produced NaN or Inf; ``step`` is the 0-based evaluation index where it first happened."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each model evaluation, before the update (k-diffusion's convention)."""

    step: int
    num_steps: int
    sigma: float
    timestep: float
    x: torch.Tensor
    x0: torch.Tensor
    batch_start: int


@dataclass(frozen=True)
class Conditions:
    """The model's conditional and unconditional inputs and the classifier-free guidance scale of one call."""

    cond: Cond = None
    uncond: Cond = None
    guidance_scale: float | None = None


@dataclass(frozen=True)
class StepContext:
    """What a guidance hook sees at evaluation ``index``: the run and the point the model is evaluated at.

    ``timestep``, ``alpha`` and ``sigma`` are per-sample tensors where the solver moved samples off the plan's
    grid (the exposure-bias time shift), else host floats.
    """

    index: int
    run: SamplingRun
    timestep: Any
    alpha: Any
    sigma: Any
    #: This step's conditions, once the ``condition`` hooks have run (``None`` before: the run's apply).
    conditions: Conditions | None = None

    @property
    def plan(self) -> SolverPlan:
        return self.run.plan

    @property
    def rows(self) -> range:
        """The global rows of the batch (the keys of the per-sample random streams)."""
        return self.run.rows

    @property
    def num_evals(self) -> int:
        return self.run.plan.num_evals

    @property
    def sigma_tilde(self) -> float:
        """The plan's noise level σ̃ = σ/α at this evaluation (the nominal one under the time shift)."""
        return float(self.run.plan.sigmas[self.index])

    @property
    def time(self) -> float:
        """Normalised diffusion time in [0, 1] at this evaluation: the process time of the plan's level over the
        process's largest time (DDPM: timestep/(N − 1); rectified flow: ≈ t), 1 at the model's noisiest level and
        0 at the data. Guidance schedules (CADS's γ(t), intermittent guidance) are written in it."""
        return normalised_time(self.run.plan, self.index)

    def noise(self, key: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """N(0, 1) draws of ``shape`` per sample, from the samples' own stream named ``key`` (one per guidance
        draw kind): with per-sample seeds a sample's draws do not depend on its batch, and they never shift the
        solver's noise. Without a noise source (the diffusers adapters) the global generator is used."""
        source = self.run.noise
        if source is None:
            return torch.randn((len(self.rows), *shape), device=device, dtype=dtype)
        return source.substream(key).draw(self.rows.start, self.rows.stop, tuple(shape), device, dtype)

    def denoise(self, x: torch.Tensor, time: float) -> torch.Tensor:
        """x̂0 = D(x, t) at normalised time ``time`` (1 = noise, as :attr:`time`) with this step's conditions (the
        run's where no ``condition`` hook ran): the model called at a level other than the step's, e.g. a re-noised
        x̂0 denoised again (the self-guided minority sampler). Builds a graph only where gradients are enabled."""
        if self.run.denoiser is None:
            raise ValueError("this run has no denoiser: a guidance that calls the model cannot run here")
        process = self.run.plan.process
        t = min(max(float(time) * float(process.t_max), float(process.t_min)), float(process.t_max))
        alpha, sigma = (float(v) for v in process.alpha_sigma(process.sigma_tilde(t)))
        c = self.conditions
        if c is None:
            c = Conditions(self.run.cond, self.run.uncond, self.run.guidance_scale)
        return self.run.denoiser.predict_x0(
            x, float(process.timestep(t)), alpha, sigma, cond=c.cond, uncond=c.uncond, guidance_scale=c.guidance_scale
        )


def normalised_time(plan: SolverPlan, index: int) -> float:
    """The normalised time of evaluation ``index`` of ``plan`` (:attr:`StepContext.time`), without a run: what a
    guidance's schedule is written in, so that it can list the evaluations it acts at before sampling."""
    process = plan.process
    t = float(process.t_from_sigma_tilde(float(plan.sigmas[index])))
    return min(max(t / float(process.t_max), 0.0), 1.0)


class Guidance:
    """Hooks at the three places a guidance method acts in a step; each one is optional (the identity).

    A sequence of guidances composes in order. ``needs_grad = True`` makes :func:`predict` evaluate the model
    on ``x.requires_grad_()`` under ``torch.enable_grad()``, so that ``guide_x0`` can differentiate x̂0 with
    respect to x (and only then is a graph built); a hook that calls ``torch.autograd.grad`` should pass
    ``retain_graph=True`` when the run itself keeps a graph (``sample(..., enable_grad=True)``).
    """

    needs_grad: bool = False

    def condition(self, ctx: StepContext, conditions: Conditions) -> Conditions:
        """The conditions and guidance scale of this step's model call (before it)."""
        return conditions

    def needs_grad_at(self, ctx: StepContext) -> bool:
        """Whether this step's model call needs the graph to x (``needs_grad`` by default); a guidance that acts at
        some steps only, or computes its gradient itself in chunks, returns ``False`` elsewhere so that
        :func:`predict` builds no graph there."""
        return self.needs_grad

    def guide_x0(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x̂0 after the model call, at sample ``x``."""
        return x0

    def transition(self, ctx: StepContext, move: Move) -> torch.Tensor:
        """The next sample, after the solver's update (``move.result``)."""
        return move.result

    @property
    def has_transition(self) -> bool:
        return type(self).transition is not Guidance.transition


def as_guidance(guidance: Guidance | Sequence[Guidance] | None) -> tuple[Guidance, ...]:
    """One guidance, a sequence or ``None``, as a tuple (checked)."""
    if guidance is None:
        return ()
    items = tuple(guidance) if isinstance(guidance, Sequence) and not isinstance(guidance, str) else (guidance,)
    for g in items:
        if not isinstance(g, Guidance):
            raise TypeError(f"guidance must be Guidance objects, got {type(g).__name__}")
    return items


class FiniteCheck:
    """NaN/Inf in x̂0, recorded on the device as one sum per step and sample and read once, at the end."""

    def __init__(self, num_evals: int, batch: int, device: torch.device, dtype: torch.dtype):
        self.sums = torch.zeros((num_evals, batch), dtype=dtype, device=device)

    def record(self, index: int, x0: torch.Tensor) -> None:
        """NaN and Inf propagate through a sum: one reduction kernel per step, no read."""
        torch.sum(x0.detach().flatten(1), dim=1, out=self.sums[index])

    def raise_if_bad(self, plan: SolverPlan, row_offset: int = 0) -> None:
        """Raise :class:`NonFiniteError` naming the first bad step and its rows (the one host read)."""
        finite = torch.isfinite(self.sums).cpu()
        if bool(finite.all()):
            return
        bad_steps, bad_rows = torch.nonzero(~finite, as_tuple=True)
        k = int(bad_steps.min())
        rows = (bad_rows[bad_steps == k] + row_offset).tolist()
        raise NonFiniteError(
            f"the model produced NaN/Inf at step {k + 1} of {plan.num_evals} (evaluation index {k}, "
            f"sigma={plan.sigmas[k]:.6g}, timestep={plan.timesteps[k]:g}) for {len(rows)} sample(s), "
            f"e.g. rows {rows[:8]}",
            step=k,
        )


def plan_timesteps(plan: SolverPlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The plan's model timesteps on ``device`` (int64 when integral, as diffusers), one scalar view each."""
    ts = plan.timesteps
    integral = bool(np.all(ts == np.round(ts)))
    return torch.as_tensor(ts, dtype=torch.int64 if integral else torch.float32).to(device).unbind(0)


@dataclass
class SamplingRun:
    """One batch on its way through a plan: everything a step reads and updates.

    ``rows`` are the batch's rows in the whole run (what per-sample random streams and callbacks are keyed
    by). ``denoiser`` may be ``None`` where the model is called outside (the diffusers adapters).
    """

    solver: Solver
    plan: SolverPlan
    state: SolverState
    denoiser: Denoiser | None = None
    cond: Cond = None
    uncond: Cond = None
    guidance_scale: float | None = None
    guidance: tuple[Guidance, ...] = ()
    noise: NoiseSource | None = None
    rows: range = range(0)
    callback: Callable[[StepInfo], None] | None = None
    finite: FiniteCheck | None = None
    _timesteps: dict[torch.device, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def start(
        cls,
        solver: Solver,
        plan: SolverPlan,
        x: torch.Tensor,
        *,
        denoiser: Denoiser | None = None,
        cond: Cond = None,
        uncond: Cond = None,
        guidance_scale: float | None = None,
        guidance: Guidance | Sequence[Guidance] | None = None,
        noise: NoiseSource | None = None,
        row_offset: int = 0,
        callback: Callable[[StepInfo], None] | None = None,
        check_finite: bool = True,
    ) -> SamplingRun:
        """A fresh run for the batch ``x`` (rows ``row_offset …``) with a new solver state."""
        finite = FiniteCheck(plan.num_evals, x.shape[0], x.device, x.dtype) if check_finite else None
        return cls(
            solver=solver,
            plan=plan,
            state=solver.init_state(),
            denoiser=denoiser,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            guidance=as_guidance(guidance),
            noise=noise,
            rows=range(row_offset, row_offset + x.shape[0]),
            callback=callback,
            finite=finite,
        )

    def timesteps(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The plan's model timesteps on ``device``, uploaded once per run."""
        ts = self._timesteps.get(device)
        if ts is None:
            ts = self._timesteps[device] = plan_timesteps(self.plan, device)
        return ts

    def branch(self) -> SamplingRun:
        """The same run with its own copy of the solver state (the tensors are shared, never modified in
        place): a trial step on the branch leaves this run untouched."""
        return replace(self, state=self.state.copy(), finite=None, callback=None)

    def reindex(self, index: torch.Tensor) -> None:
        """Keep the samples ``index`` (e.g. resampled particles' ancestors), as many as before: the solver state
        and the per-sample conditions are gathered with the same indices; the caller gathers x.

        The random streams are not gathered, on purpose: row i keeps drawing from its own stream, so a particle that
        duplicates an ancestor does not replay the ancestor's future noise."""
        batch = len(self.rows)
        if index.ndim != 1 or index.numel() != batch:
            raise ValueError(f"reindex keeps the batch size {batch}: got an index of shape {tuple(index.shape)}")
        self.state = self.state.index_select(index)
        self.cond = gather_conditions(self.cond, index, batch)
        self.uncond = gather_conditions(self.uncond, index, batch)
        if self.finite is not None:
            self.finite.sums = self.finite.sums.index_select(1, index.to(self.finite.sums.device))


def gather_conditions(cond: Any, index: torch.Tensor, batch: int) -> Any:
    """The model inputs of the rows ``index``: a tensor whose first dimension is the ``batch`` is per-sample and
    gathered; anything else is shared and kept; mappings are walked (``index`` may repeat rows or change the size)."""
    if isinstance(cond, Mapping):
        return {k: gather_conditions(v, index, batch) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim >= 1 and cond.shape[0] == batch:
        return cond.index_select(0, index.to(cond.device))
    return cond


@dataclass
class Move:
    """The update of one step, as a transition hook sees it: the corrected sample ``x``, the step's
    coefficients ``c``, the solver state before the update (``state_before``) and the result.

    :meth:`candidates` replays the update from the same state with fresh noise, several times per sample.
    """

    run: SamplingRun
    index: int
    c: LinearStep
    x: torch.Tensor
    state_before: SolverState
    result: torch.Tensor

    def candidates(self, copies: int) -> tuple[torch.Tensor, SolverState]:
        """``copies`` updates per sample from the state before this step, in one batch of B·``copies`` rows
        (sample b's candidates are rows b·copies … b·copies + copies − 1) and the matching solver states.

        Each candidate draws its own noise from its sample's random stream (the stream advances by
        ``copies`` draws); a deterministic step gives ``copies`` equal candidates. The step's planned
        compensation is replayed, not one passed to :func:`advance` explicitly (the ratio search's).
        """
        if int(copies) < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        batch = self.x.shape[0]
        index = torch.arange(batch, device=self.x.device).repeat_interleave(int(copies))
        state = self.state_before.index_select(index)
        x = self.x.index_select(0, index)
        z = None
        if self.run.plan.steps[self.index].noise != 0.0:
            draws = [_draw_noise(self.run, self.x) for _ in range(int(copies))]
            z = torch.stack(draws, dim=1).flatten(0, 1)
        out = self.run.solver.advance(self.run.plan, state, self.index, self.c, x, z)
        return out, state


def evaluation_point(run: SamplingRun, index: int, device: torch.device) -> tuple[Any, Any, Any]:
    """(model timestep, α, σ) of evaluation ``index``: per-sample tensors where the solver moved samples off
    the plan's grid, else the plan's (a device scalar and two host floats)."""
    point = run.solver.evaluation_point(run.plan, run.state, index)
    if point is not None:
        return point
    return run.timesteps(device)[index], float(run.plan.alpha_t[index]), float(run.plan.sigma_t[index])


def _context(run: SamplingRun, index: int, device: torch.device) -> StepContext:
    return StepContext(index, run, *evaluation_point(run, index, device))


def predict(run: SamplingRun, index: int, x: torch.Tensor) -> torch.Tensor:
    """x̂0 at evaluation ``index`` (the first part of :func:`step`): guidance conditions, the model, guided x̂0."""
    if run.denoiser is None:
        raise ValueError("this run has no denoiser: pass the model output's x̂0 to step(..., x0=...)")
    if not run.guidance:  # the common case, kept lean: it runs once per model evaluation
        t, alpha, sigma = evaluation_point(run, index, x.device)
        return run.denoiser.predict_x0(
            x, t, alpha, sigma, cond=run.cond, uncond=run.uncond, guidance_scale=run.guidance_scale
        )
    ctx = _context(run, index, x.device)
    conditions = Conditions(run.cond, run.uncond, run.guidance_scale)
    for g in run.guidance:
        conditions = g.condition(ctx, conditions)
    ctx = replace(ctx, conditions=conditions)
    if not any(g.needs_grad_at(ctx) for g in run.guidance):
        x0 = _call(run.denoiser, ctx, x, conditions)
        for g in run.guidance:
            x0 = g.guide_x0(ctx, x, x0)
        return x0
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        x_in = x if x.requires_grad else x.detach().requires_grad_(True)
        x0 = _call(run.denoiser, ctx, x_in, conditions)
        for g in run.guidance:
            x0 = g.guide_x0(ctx, x_in, x0)
    return x0 if outer else x0.detach()


def _call(denoiser: Denoiser, ctx: StepContext, x: torch.Tensor, c: Conditions) -> torch.Tensor:
    return denoiser.predict_x0(
        x, ctx.timestep, ctx.alpha, ctx.sigma, cond=c.cond, uncond=c.uncond, guidance_scale=c.guidance_scale
    )


def correct(run: SamplingRun, index: int, x: torch.Tensor, x0: torch.Tensor) -> tuple[LinearStep, torch.Tensor]:
    """The solver's first half at evaluation ``index`` (after the NaN bookkeeping and the callback)."""
    if run.finite is not None:
        run.finite.record(index, x0)
    if run.callback is not None:
        plan = run.plan
        run.callback(
            StepInfo(
                index, plan.num_evals, float(plan.sigmas[index]), float(plan.timesteps[index]), x, x0, run.rows.start
            )
        )
    return run.solver.correct(run.plan, run.state, index, x, x0)


def _draw_noise(run: SamplingRun, like: torch.Tensor) -> torch.Tensor:
    if run.noise is None:
        raise ValueError("a stochastic step needs a noise source or an explicit noise tensor")
    return run.noise.draw(run.rows.start, run.rows.stop, like.shape[1:], like.device, like.dtype)


def advance(
    run: SamplingRun,
    index: int,
    c: LinearStep,
    x: torch.Tensor,
    z: torch.Tensor | None = None,
    compensation: Sequence[float | torch.Tensor] | None = None,
) -> torch.Tensor:
    """The solver's second half at evaluation ``index``, then the guidance transitions.

    ``z`` is the step's noise (drawn from the run's noise source when the step is stochastic and none is
    given); ``compensation`` overrides DC-Solver's planned weights (the ratio search).
    """
    if z is None and run.plan.steps[index].noise != 0.0:
        z = _draw_noise(run, x)
    transitions = [g for g in run.guidance if g.has_transition] if run.guidance else ()
    before = run.state.copy() if transitions else None
    out = run.solver.advance(run.plan, run.state, index, c, x, z, compensation)
    if transitions:
        ctx = _context(run, index, x.device)
        for g in transitions:
            assert before is not None
            out = g.transition(ctx, Move(run, index, c, x, before, out))
    return out


def step(
    run: SamplingRun,
    index: int,
    x: torch.Tensor,
    x0: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    compensation: Sequence[float | torch.Tensor] | None = None,
) -> torch.Tensor:
    """One whole step from evaluation point ``index`` to the next: :func:`predict` (unless ``x0`` is given),
    :func:`correct`, :func:`advance`."""
    if x0 is None:
        x0 = predict(run, index, x)
    c, x = correct(run, index, x, x0)
    return advance(run, index, c, x, z, compensation)


def integrate(
    run: SamplingRun,
    x: torch.Tensor,
    progress: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Every step of the run's plan from ``x`` (at its first level); raises :class:`NonFiniteError` at the end
    if the model produced NaN/Inf."""
    for k in range(run.plan.num_evals):
        x = step(run, k, x)
        if progress is not None:
            progress(1)
    if run.finite is not None:
        run.finite.raise_if_bad(run.plan, run.rows.start)
    return x
