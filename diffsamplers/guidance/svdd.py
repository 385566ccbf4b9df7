"""Soft value-based decoding (SVDD; Li, Zhao, Wang, …, Levine & Uehara, "Derivative-Free Guidance in Continuous
and Discrete Diffusion Models with Soft Value-Based Decoding", 2024, arXiv:2408.08252) as a
:class:`~diffsamplers.step.Guidance` acting on the sample after each update (a ``transition`` hook).

**Soft value and target** (the paper's Sec. 3). For a reward r and a temperature α > 0 the soft value of a noisy
sample is

    v_t(x_t) = α log E_pre[exp(r(x0)/α) | x_t],

with v_0 = r, and the optimal (soft-optimal) step of the pre-trained sampler is

    p*(x_{t−1} | x_t) ∝ p_pre(x_{t−1} | x_t) · exp(v_{t−1}(x_{t−1})/α),

whose chain samples the reward-tilted distribution p_pre(x0)·exp(r(x0)/α) (the target of FK steering with λ = 1/α,
:mod:`diffsamplers.guidance.fk_steering`), up to the initial level, where the tilt exp(v_T/α) is ≈ constant.

**Algorithm** (the paper's Alg. 1, Sec. 4): at each step draw M candidates x_{t−1}^{(m)} ~ p_pre(· | x_t) per sample,
weigh them by w_m = exp(v̂_{t−1}(x_{t−1}^{(m)})/α) and keep one drawn from Categorical(w/Σw) (importance sampling of
p* with M proposals; M = 1 is the pre-trained sampler, M → ∞ the exact p* when v̂ = v). As α → 0 the pick becomes the
argmax of v̂, which is what both official repositories do (``alpha=0`` here: the explicit argmax mode, no draw).
The selection is :func:`select_candidates`, independent of the continuous step (the masked-diffusion samplers reuse
it): with α > 0 one uniform per sample, from the sample's own stream ``"svdd"`` through the normal CDF, picks by the
inverse CDF of the softmax.

**Value estimators** ``value=`` (the paper's SVDD-PM and SVDD-MC, Sec. 4):

* ``"pm"`` — SVDD-PM, training-free: v̂(x) = r(x̂0(x)), the reward of the posterior mean (one model call at the
  candidates' level for the B·M candidates of a step, in one batch; at σ̃ = 0 the candidate is clean and
  v̂ = r(candidate));
* ``"mc"`` — the soft value by Monte-Carlo rollouts (SVDD-MC's regression target, estimated on the fly instead of
  learned): from each candidate, ``rollouts`` independent rollouts of the run's own (stochastic) sampler — the
  pre-trained process the soft value is defined by — to the plan's last level, on ``rollout_steps`` steps taken
  evenly from the run's remaining levels (``None``: all of them; the solver plans the sub-grid afresh, so a solver
  tied to one grid, DC-Solver's learned ratios, cannot roll out), all B·M·``rollouts`` rollouts in one batch;
  v̂ = α log mean_j exp(r(x0^{(j)})/α), the mean reward when α = 0 (unbiased for E[r | x]; for α > 0 the
  log-mean-exp is biased low by Jensen's inequality, ≈ α·Var(e^{r/α})/(2 R E[e^{r/α}]²) with R rollouts; few
  ``rollout_steps`` add the solver's discretisation error). Rollout noise comes from the samples' own stream
  ``"svdd-rollouts"``;
* a callable ``value(x, sigma_tilde) → (B,)`` — a learned value network (the paper's SVDD-MC) or a closed-form soft
  value, called with the candidates and their level σ̃ (a host float).

A candidate at the plan's last level is what the run returns (σ̃ = 0, where v_0 = r, or the smallest level of a grid
that stops there): it is scored by r itself, whatever the estimator.

**Cost**: M candidates per step (M noise draws per sample from the solver's stream, one batched solver update of
B·M rows) plus, per step, one model call on B·M rows (PM), ``rollout_steps`` (default: every remaining level)
model calls on B·M·``rollouts`` rows (MC) or one call of the value callable; one reward call per step on B·M rows (PM) or B·M·``rollouts`` rows (MC).
Nothing is differentiated (no backprop: any reward, differentiable or not, under ``torch.no_grad``). The model
calls use the run's conditions and guidance scale repeated per candidate (a ``condition`` hook's per-step changes
are not seen) at the plan's nominal levels. A step whose update injects no noise (the last step to σ̃ = 0 of
DDIM, SDE-DPM-Solver++ and Euler–Maruyama) has M equal candidates and is left as the solver made it; a sampler
without any noise (``plan.stochastic`` false) is refused (``ValueError``). M = 1 returns the solver's own update:
the pre-trained sampler bit for bit. For finite M the pick is self-normalised importance sampling, biased towards
the pre-trained step by O(1/M) per step (on the exact mixture of the tests, M = 32 on 100 steps leaves ≈ 0.05 of a
mean shift of 1.1).

**Host reads**: checking the values for NaN/Inf reads the device once per step (``ValueError`` naming the reward
or value and the step). Values are float64 on the device. After sampling, :attr:`SVDD.history` holds one
:class:`SVDDRecord` per selecting step and chunk (every candidate's value and the chosen index), and
:attr:`SVDD.values` the chosen values ``(steps, N)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..denoiser import slice_cond
from ..schedules.schedule import Schedule
from ..step import Guidance, Move, SamplingRun, StepContext, gather_conditions, step
from .particles import check_count, group_uniforms
from .rewards import checked_score

__all__ = ["VALUE_ESTIMATORS", "SVDD", "SVDDRecord", "repeat_conditions", "select_candidates"]

#: The built-in value estimators of :class:`SVDD` (a callable ``value(x, sigma_tilde)`` is the third kind).
VALUE_ESTIMATORS = ("pm", "mc")

ValueFn = Callable[[torch.Tensor, float], torch.Tensor]


def select_candidates(values: torch.Tensor, alpha: float, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """The chosen candidate of each sample ``(B,)`` (int64) from the candidates' values ``(B, M)``.

    ``alpha == 0``: the argmax (the first one on ties; no uniforms needed). ``alpha > 0``: a draw from
    Categorical(softmax(values/α)) (the paper's Alg. 1, step 3) by the inverse CDF at ``uniforms`` ``(B,)`` in
    [0, 1) (float64 arithmetic). Values must be finite (the caller checks them).
    """
    if values.ndim != 2 or values.shape[1] < 1:
        raise ValueError(f"values must have shape (B, M) with M ≥ 1, got {tuple(values.shape)}")
    alpha = _check_alpha(alpha)
    if alpha == 0.0:
        return torch.argmax(values, dim=1)
    if uniforms is None or tuple(uniforms.shape) != (values.shape[0],):
        got = None if uniforms is None else tuple(uniforms.shape)
        raise ValueError(f"a draw at α = {alpha:g} needs one uniform per sample, shape ({values.shape[0]},), got {got}")
    probs = torch.softmax(values.to(torch.float64) / alpha, dim=1)
    cdf = torch.cumsum(probs, dim=1)
    u = uniforms.to(device=cdf.device, dtype=torch.float64).unsqueeze(1) * cdf[:, -1:]
    chosen = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return chosen.clamp_(max=values.shape[1] - 1)


def repeat_conditions(cond: Any, batch: int, copies: int) -> Any:
    """The model inputs of ``copies`` consecutive rows per sample (per-sample tensors repeated row by row, the rest
    shared): :func:`~diffsamplers.step.gather_conditions` with each row's index repeated."""
    return gather_conditions(cond, torch.arange(batch).repeat_interleave(copies), batch)


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"the temperature α must be a number ≥ 0, got {alpha!r}") from None
    if not math.isfinite(a) or a < 0.0:
        raise ValueError(f"the temperature α must be finite and ≥ 0 (0: argmax), got {alpha!r}")
    return a


@dataclass(frozen=True)
class SVDDRecord:
    """One selecting step of one chunk: evaluation ``index``, the candidates' level ``sigma`` (σ̃), the chunk's
    global ``rows``, every candidate's value ``(B, M)`` (float64) and the chosen candidate ``(B,)``."""

    index: int
    sigma: float
    rows: range
    values: torch.Tensor
    chosen: torch.Tensor

    @property
    def chosen_values(self) -> torch.Tensor:
        """The value of each sample's chosen candidate ``(B,)``."""
        return self.values.gather(1, self.chosen.unsqueeze(1)).squeeze(1)


class SVDD(Guidance):
    """SVDD (Li et al. 2024, Alg. 1): M candidates per sample and step, the one of highest soft value kept
    (``alpha=0``) or one drawn with probability ∝ exp(v̂/α), towards p_pre(x0)·exp(r(x0)/α).

    Args:
        reward: per-sample reward r of a batch of clean samples ``(B, *shape) → (B,)``; any callable (evaluated under
            ``torch.no_grad``).
        num_candidates: M ≥ 1, the candidates per sample and step (M = 1: the pre-trained sampler, bit for bit).
        alpha: the temperature α ≥ 0 of the soft value and of the selection; 0 is the explicit argmax mode of the
            official repositories (greedy: the highest reward, less diversity), α > 0 targets p_pre·exp(r/α).
        value: ``"pm"`` (posterior mean, SVDD-PM), ``"mc"`` (Monte-Carlo rollouts) or a callable
            ``value(x, sigma_tilde) → (B,)`` (module docstring).
        rollouts: the rollouts per candidate of ``value="mc"``.
        rollout_steps: the steps of a rollout of ``value="mc"`` (with the run's solver), taken evenly from the run's
            remaining levels (``None``: every remaining level).
        value_chunk: the rows per model call of ``value="pm"`` (``None``: all B·M candidates in one call, the
            fastest where memory allows; a multiple of B bounds the memory of large M on large models).

    After sampling, :attr:`history` lists one :class:`SVDDRecord` per selecting step (chunk after chunk) and
    :attr:`values` the value of each returned sample's chosen candidate at every selecting step.
    """

    #: The stream of the selection uniforms (α > 0) and the one of the rollouts' noise (``value="mc"``).
    stream = "svdd"
    rollout_stream = "svdd-rollouts"

    def __init__(
        self,
        reward: Callable[[torch.Tensor], torch.Tensor],
        num_candidates: int,
        *,
        alpha: float = 0.0,
        value: str | ValueFn = "pm",
        rollouts: int = 4,
        rollout_steps: int | None = None,
        value_chunk: int | None = None,
    ):
        if not callable(reward):
            raise TypeError(f"reward must be callable, got {type(reward).__name__}")
        if isinstance(value, str):
            if value not in VALUE_ESTIMATORS:
                raise ValueError(f"unknown value estimator {value!r}: expected one of {VALUE_ESTIMATORS} or a callable")
        elif not callable(value):
            raise ValueError(f"value must be one of {VALUE_ESTIMATORS} or a callable, got {type(value).__name__}")
        self.reward = reward
        self.num_candidates = check_count("num_candidates", num_candidates)
        self.alpha = _check_alpha(alpha)
        self.value = value
        self.rollouts = check_count("rollouts", rollouts)
        self.rollout_steps = None if rollout_steps is None else check_count("rollout_steps", rollout_steps)
        self.value_chunk = None if value_chunk is None else check_count("value_chunk", value_chunk)
        self.history: list[SVDDRecord] = []

    # -- results --------------------------------------------------------------------------------
    @property
    def value_steps(self) -> list[int]:
        """The evaluation indices at which candidates were selected (in the last ``sample`` call)."""
        return list(dict.fromkeys(r.index for r in self.history))

    @property
    def values(self) -> torch.Tensor | None:
        """The chosen candidates' values ``(len(value_steps), N)`` (float64), rows in the output's order; ``None``
        before sampling or when no step selected (M = 1)."""
        if not self.history:
            return None
        per_step: dict[int, list[torch.Tensor]] = {k: [] for k in self.value_steps}
        for record in self.history:
            per_step[record.index].append(record.chosen_values)
        return torch.stack([torch.cat(v) for v in per_step.values()])

    # -- the step -------------------------------------------------------------------------------
    def transition(self, ctx: StepContext, move: Move) -> torch.Tensor:
        """Replace the solver's update by the selected one of M candidates (with its solver state)."""
        if ctx.index == 0 and ctx.rows.start == 0:
            self.history = []  # a new sample() call
        if not ctx.plan.stochastic:
            raise ValueError(
                f"SVDD selects among random candidates, which needs a stochastic sampler (a deterministic one gives M "
                f"equal candidates): {ctx.run.solver.name} takes no random step; use e.g. ddim-eta1, sde-dpm++2m or "
                "euler-maruyama"
            )
        m = self.num_candidates
        if m == 1 or ctx.plan.steps[ctx.index].noise == 0.0:
            return move.result
        candidates, states = move.candidates(m)
        with torch.no_grad():
            values = self.candidate_values(ctx, candidates.detach()).view(-1, m)
            uniforms = None
            if self.alpha > 0.0:
                uniforms = group_uniforms(ctx, self.stream, 1, 1, values.device)[:, 0]
            chosen = select_candidates(values, self.alpha, uniforms)
        rows = torch.arange(values.shape[0], device=chosen.device) * m + chosen
        ctx.run.state = states.index_select(rows.to(candidates.device))
        self.history.append(SVDDRecord(ctx.index, float(ctx.plan.sigmas[ctx.index + 1]), ctx.rows, values, chosen))
        return candidates.index_select(0, rows.to(candidates.device))

    @torch.no_grad()
    def candidate_values(self, ctx: StepContext, x: torch.Tensor) -> torch.Tensor:
        """v̂ of ``x``, the M candidates per sample (B·M rows, sample b's at b·M … b·M + M − 1) at the level after
        evaluation ``ctx.index``, by this guidance's estimator: float64 ``(B·M,)``, checked for shape and NaN/Inf."""
        plan = ctx.plan
        level = ctx.index + 1
        sigma = float(plan.sigmas[level])
        per = self.num_candidates
        if x.shape[0] != len(ctx.rows) * per:
            raise ValueError(f"expected {per} candidates for each of {len(ctx.rows)} samples, got {x.shape[0]} rows")
        if sigma == 0.0 or level == plan.num_evals:  # the returned sample: v_0 = r
            return checked_score(self.reward, (x,), ctx, "the reward", "candidates at the last level", per)
        if callable(self.value):
            return checked_score(self.value, (x, sigma), ctx, "the value", f"candidates at sigma={sigma:.6g}", per)
        if ctx.run.denoiser is None:
            raise ValueError("SVDD's value estimators 'pm' and 'mc' call the model, and this run has no denoiser")
        if self.value == "pm":
            x0 = self._denoise(ctx.run, level, x, per)
            return checked_score(self.reward, (x0,), ctx, "the reward", "x̂0 of the candidates", per)
        return self._rollout_value(ctx, level, x)

    def _denoise(self, run: SamplingRun, level: int, x: torch.Tensor, copies: int) -> torch.Tensor:
        """x̂0 of the ``copies`` candidates per sample ``x`` at the plan's ``level``: one batched model call, or calls
        of ``value_chunk`` rows."""
        assert run.denoiser is not None
        batch = len(run.rows)
        plan = run.plan
        total = x.shape[0]
        cond = repeat_conditions(run.cond, batch, copies)
        uncond = repeat_conditions(run.uncond, batch, copies)
        chunk = total if self.value_chunk is None else self.value_chunk
        parts = [
            run.denoiser.predict_x0(
                x[start : start + chunk],
                run.timesteps(x.device)[level],
                float(plan.alpha_t[level]),
                float(plan.sigma_t[level]),
                cond=slice_cond(cond, start, min(start + chunk, total), total),
                uncond=slice_cond(uncond, start, min(start + chunk, total), total),
                guidance_scale=run.guidance_scale,
            )
            for start in range(0, total, chunk)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def rollout_levels(self, num_evals: int, level: int) -> np.ndarray:
        """The plan's level indices a rollout from ``level`` visits (``rollout_steps`` steps, evenly, to the last)."""
        levels = np.arange(level, num_evals + 1)
        if self.rollout_steps is not None and self.rollout_steps < levels.size - 1:
            levels = np.unique(np.round(np.linspace(level, num_evals, self.rollout_steps + 1)).astype(np.int64))
        return levels

    def _rollout_value(self, ctx: StepContext, level: int, x: torch.Tensor) -> torch.Tensor:
        """α log mean exp(r/α) over ``rollouts`` rollouts of the run's solver per candidate, all in one batch."""
        run, plan = ctx.run, ctx.plan
        levels = self.rollout_levels(plan.num_evals, level)
        schedule = Schedule(plan.sigmas[levels], timesteps=plan.timesteps[levels[:-1]])
        solver = run.solver
        sub = solver.plan(plan.process, schedule)
        per = self.num_candidates * self.rollouts
        batch = len(run.rows)
        xs = x.repeat_interleave(self.rollouts, dim=0)
        rollout = SamplingRun.start(
            solver,
            sub,
            xs,
            denoiser=run.denoiser,
            cond=repeat_conditions(run.cond, batch, per),
            uncond=repeat_conditions(run.uncond, batch, per),
            guidance_scale=run.guidance_scale,
            check_finite=False,
        )
        for j in range(sub.num_evals):
            z = None
            if sub.steps[j].noise != 0.0:
                z = ctx.noise(self.rollout_stream, (per, *x.shape[1:]), x.device, x.dtype).flatten(0, 1)
            xs = step(rollout, j, xs, z=z)
        r = checked_score(self.reward, (xs,), ctx, "the reward", "the rollouts' final samples", per)
        r = r.view(-1, self.rollouts)
        if self.alpha == 0.0:
            return r.mean(dim=1)
        return self.alpha * (torch.logsumexp(r / self.alpha, dim=1) - math.log(self.rollouts))
