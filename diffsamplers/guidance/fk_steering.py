"""Feynman–Kac steering (Singhal, Horvitz, Teehan et al., "A General Framework for Inference-time Scaling and
Steering of Diffusion Models", ICML 2025, arXiv:2501.06848) as a :class:`~diffsamplers.step.Guidance` acting on
the sample after each update (a ``transition`` hook).

The target is the reward-tilted distribution (the paper's Eq. 1)

    p_tgt(x0) ∝ p_θ(x0) · exp(λ r(x0)),

sampled by sequential Monte Carlo with the (stochastic) sampler as the proposal: K particles per group evolve
independently, and at the resampling steps k they are weighted by a potential G_k of an intermediate reward
r_k = r(x̂0(x_k)) — the reward of the step's x̂0 — and resampled (the paper's Algorithm 1). The potentials
(the paper's Sec. 3.2, "choosing potentials") are, with the log-potentials applied so far Λ = Σ log G:

* ``"difference"`` — log G_k = λ (r_k − r_{k'}), r_{k'} the reward at the previous resampling step (0 at first);
  it telescopes, Π G = exp(λ r_k);
* ``"max"`` — log G_k = λ max_{j ≤ k} r_j, the running maximum of the particle's rewards;
* ``"sum"`` — log G_k = λ Σ_{j ≤ k} r_j, the running sum;

and at the final step the potential is corrected to log G_N = λ r(x0) − Λ, so that the product of all potentials
along a path is exp(λ r(x0)) whatever the intermediate choice (the paper's condition Π_t G_t = exp(λ r(x0))):
the returned particles then follow p_tgt as K grows. For the final step the reward is taken on the returned
sample itself, not on an x̂0. (For ``"difference"`` the correction is the telescoping term λ (r(x0) − r_{k'}).)

**Groups.** Consecutive rows form a group of ``num_particles`` K: rows g·K … g·K + K − 1 are the particles of
sample g and resample among themselves only (:mod:`diffsamplers.guidance.resampling`). A group must not be split
across chunks of ``sample(..., batch_size=...)``: the batch size must be a multiple of K (checked, ValueError).

**Schedule.** The reward is evaluated (and the particles weighted) at every ``interval``-th evaluation whose
normalised time (:attr:`StepContext.time`, 1 = noise) is at most ``start``, and at the last evaluation. At those
steps the groups resample: always (``ess_threshold=None``, the paper's default) or only where the effective sample
size falls below ``ess_threshold``·K (:func:`~diffsamplers.guidance.resampling.resample_adaptively`; weights not
resampled are carried to the next step, a proper SMC — the official code drops them). At the last evaluation the
groups always resample (``resample_final=True``) so that the returned particles follow the tilted target without
weights; with ``resample_final=False`` the last weights are only recorded (:attr:`FKSteering.log_weights`) for the
caller to importance-weight.

**Randomness.** The uniforms of a group's resampling come from the first row of the group's own stream
(:meth:`StepContext.noise`, key ``"fk-steering"``): N(0, 1) draws mapped to [0, 1) by the normal CDF, so with
per-sample seeds a group's resampling does not depend on the batch it ran in, and the solver's noise is not
shifted. Particles that copy an ancestor keep drawing from their own streams
(:meth:`~diffsamplers.step.SamplingRun.reindex`), so duplicates diverge again (the sampler must be stochastic —
e.g. SDE-DPM-Solver++ or DDIM with η = 1; a deterministic sampler keeps duplicates identical, the paper's
pitfall). With λ = 0 and systematic resampling every weight is equal and every ancestor is the identity: the
samples are exactly the unsteered sampler's.

**Cost and host reads.** The reward runs under ``torch.no_grad`` (any callable, differentiable or not) once per
resampling step on the whole batch; log-weights are float64 on the device. Checking the reward for NaN/Inf and
the resampler's own checks read the device once per resampling step. Not for DC-Solver's ratio search (its trial
steps would advance the particles' weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..solvers.base import SolverPlan
from ..step import Guidance, Move, StepContext, normalised_time
from .resampling import SCHEMES, effective_sample_size, resample, resample_adaptively

__all__ = ["POTENTIALS", "FKSteering", "ResamplingRecord"]

#: The potentials :class:`FKSteering` knows.
POTENTIALS = ("difference", "max", "sum")

#: The key of the resampling uniforms' stream.
STREAM = "fk-steering"


@dataclass(frozen=True)
class ResamplingRecord:
    """One weighting step of one chunk: the evaluation ``index``, the ESS per group before resampling, which
    groups resampled, and the ancestors as global rows (row i of the chunk took the particle at ``ancestors[i]``;
    the identity for groups not resampled)."""

    index: int
    ess: torch.Tensor
    resampled: torch.Tensor
    ancestors: torch.Tensor


@dataclass
class _Trace:
    """The particles' carried quantities in one chunk (rows ``rows``), all float64 on the device."""

    rows: range
    log_weights: torch.Tensor  # (G, K), since the last resampling
    spent: torch.Tensor  # (B,): Σ log G applied so far along each particle's path
    running: torch.Tensor  # (B,): last reward (difference), running max or running sum of rewards
    rewards: torch.Tensor | None = None  # (B,): the latest reward
    records: list[ResamplingRecord] = field(default_factory=list)


class FKSteering(Guidance):
    """FK steering (Singhal et al. 2025) towards p_θ(x0)·exp(λ r(x0)) with K particles per group.

    Args:
        reward: per-sample reward r of a batch of clean samples ``(B, *shape) → (B,)``; any callable (evaluated
            under ``torch.no_grad``).
        num_particles: K, the particles per group (consecutive rows).
        lam: λ ≥ 0, the inverse temperature of the tilt (λ = 0: the base distribution).
        potential: ``"difference"``, ``"max"`` or ``"sum"`` (module docstring).
        interval: weight and resample at every ``interval``-th evaluation (and at the last).
        start: weight only at evaluations with normalised time ≤ ``start`` (1: from the first; the paper starts
            late because x̂0's reward is uninformative at high noise).
        ess_threshold: ``None`` resamples at every weighting step; a value in (0, 1] only where ESS < value·K.
        scheme: the resampling scheme (:data:`~diffsamplers.guidance.resampling.SCHEMES`).
        resample_final: resample every group at the last evaluation (otherwise its weights are only recorded).

    After sampling, :attr:`history` lists one :class:`ResamplingRecord` per weighting step (per chunk),
    :attr:`log_weights` holds each particle's final log-weight (0 after a final resampling) and :attr:`rewards`
    the final reward of every returned particle — in the order of the rows of the output.
    """

    def __init__(
        self,
        reward: Callable[[torch.Tensor], torch.Tensor],
        num_particles: int,
        lam: float = 10.0,
        potential: str = "difference",
        *,
        interval: int = 1,
        start: float = 1.0,
        ess_threshold: float | None = None,
        scheme: str = "systematic",
        resample_final: bool = True,
    ):
        if not callable(reward):
            raise TypeError(f"reward must be callable, got {type(reward).__name__}")
        if isinstance(num_particles, bool) or int(num_particles) != num_particles or int(num_particles) < 1:
            raise ValueError(f"num_particles must be an integer ≥ 1, got {num_particles!r}")
        lam = float(lam)
        if not lam >= 0.0 or lam == float("inf"):
            raise ValueError(f"the inverse temperature λ must be finite and ≥ 0, got {lam!r}")
        if potential not in POTENTIALS:
            raise ValueError(f"unknown potential {potential!r}: expected one of {POTENTIALS}")
        if isinstance(interval, bool) or int(interval) != interval or int(interval) < 1:
            raise ValueError(f"interval must be an integer ≥ 1, got {interval!r}")
        if not 0.0 <= float(start) <= 1.0:
            raise ValueError(f"start is a normalised time in [0, 1], got {start!r}")
        if ess_threshold is not None and not 0.0 < float(ess_threshold) <= 1.0:
            raise ValueError(f"the ESS threshold must lie in (0, 1], got {ess_threshold!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown resampling scheme {scheme!r}: expected one of {SCHEMES}")
        self.reward = reward
        self.num_particles = int(num_particles)
        self.lam = lam
        self.potential = potential
        self.interval = int(interval)
        self.start = float(start)
        self.ess_threshold = None if ess_threshold is None else float(ess_threshold)
        self.scheme = scheme
        self.resample_final = bool(resample_final)
        self._traces: list[_Trace] = []

    # -- schedule -------------------------------------------------------------------------------
    def is_weighting_step(self, index: int, num_evals: int, time: float) -> bool:
        """Whether evaluation ``index`` (0-based) of ``num_evals`` weights the particles: every ``interval``-th
        evaluation ((index + 1) divisible by ``interval``) at normalised time ≤ ``start``, and the last one."""
        if index == num_evals - 1:
            return True
        return (index + 1) % self.interval == 0 and time <= self.start

    def weighting_steps(self, plan: SolverPlan) -> list[int]:
        """The evaluations of ``plan`` at which the particles are weighted (and possibly resampled)."""
        n = plan.num_evals
        return [k for k in range(n) if self.is_weighting_step(k, n, normalised_time(plan, k))]

    # -- results --------------------------------------------------------------------------------
    @property
    def history(self) -> list[ResamplingRecord]:
        """Every weighting step of the last :func:`~diffsamplers.sampling.sample` call, chunk after chunk."""
        return [r for t in self._traces for r in t.records]

    @property
    def log_weights(self) -> torch.Tensor | None:
        """The particles' final log-weights ``(groups, K)`` (float64), all chunks; ``None`` before sampling."""
        if not self._traces:
            return None
        return torch.cat([t.log_weights for t in self._traces], dim=0)

    @property
    def rewards(self) -> torch.Tensor | None:
        """The reward of each returned particle ``(N,)`` (float64); ``None`` before sampling."""
        if not self._traces or any(t.rewards is None for t in self._traces):
            return None
        return torch.cat([t.rewards for t in self._traces if t.rewards is not None], dim=0)

    # -- the hook -------------------------------------------------------------------------------
    def _trace(self, ctx: StepContext, like: torch.Tensor) -> _Trace:
        rows, k = ctx.rows, self.num_particles
        if len(rows) % k != 0 or rows.start % k != 0:
            raise ValueError(
                f"FK steering needs whole groups of num_particles={k} consecutive rows in a batch: got rows "
                f"{rows.start}…{rows.stop - 1}; make batch_size a multiple of {k}"
            )
        if ctx.index == 0 or not self._traces or self._traces[-1].rows != rows:
            if ctx.index == 0 and rows.start == 0:
                self._traces = []  # a new sample() call
            zeros = torch.zeros(len(rows), dtype=torch.float64, device=like.device)
            self._traces.append(_Trace(rows, zeros.view(-1, k).clone(), zeros.clone(), zeros.clone()))
        return self._traces[-1]

    def _evaluate(self, ctx: StepContext, x: torch.Tensor, where: str) -> torch.Tensor:
        with torch.no_grad():
            r = self.reward(x)
        name = getattr(self.reward, "__name__", type(self.reward).__name__)
        step = f"step {ctx.index + 1} of {ctx.num_evals} (evaluation index {ctx.index}, {where})"
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (x.shape[0],):
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"the reward {name!r} must return a tensor of shape ({x.shape[0]},), got {got} at {step}")
        r = r.detach().to(device=x.device, dtype=torch.float64)
        finite = torch.isfinite(r)
        if not bool(finite.all()):  # the one host read of the step
            bad = (torch.nonzero(~finite).flatten() + ctx.rows.start).tolist()
            raise ValueError(f"the reward {name!r} returned NaN/Inf at {step} for rows {bad[:8]}")
        return r

    def _uniforms(self, ctx: StepContext, device: torch.device) -> torch.Tensor:
        """(G, K) uniforms in [0, 1): each group's first row's N(0, 1) draws through the normal CDF."""
        k = self.num_particles
        z = ctx.noise(STREAM, (k,), device, torch.float64)[::k]
        return torch.special.ndtr(z).clamp_(max=1.0 - 2.0**-53)

    def transition(self, ctx: StepContext, move: Move) -> torch.Tensor:
        """Weight the particles at a weighting step and resample them (with the solver state and conditions)."""
        out = move.result
        trace = self._trace(ctx, out)
        n = ctx.num_evals
        if not self.is_weighting_step(ctx.index, n, ctx.time):
            return out
        final = ctx.index == n - 1
        if final:
            r = self._evaluate(ctx, out, "the returned sample")
            log_g = self.lam * r - trace.spent
        else:
            history = move.state_before.history
            if not history:
                raise ValueError("FK steering needs the step's x̂0 in the solver state, and there is none")
            r = self._evaluate(ctx, history[-1], "x̂0")
            if self.potential == "difference":
                running = r
                log_g = self.lam * r - trace.spent
            elif self.potential == "max":
                running = r if not trace.records else torch.maximum(trace.running, r)
                log_g = self.lam * running
            else:
                running = trace.running + r
                log_g = self.lam * running
            trace.running = running
        trace.spent = trace.spent + log_g
        groups, k = trace.log_weights.shape
        log_weights = trace.log_weights + log_g.view(groups, k)
        ess = effective_sample_size(log_weights)
        uniforms = self._uniforms(ctx, out.device)
        if (final and self.resample_final) or (not final and self.ess_threshold is None):
            ancestors = resample(log_weights, uniforms, self.scheme)
            log_weights = torch.zeros_like(log_weights)
            resampled = torch.ones(groups, dtype=torch.bool, device=log_weights.device)
        elif final:
            ancestors = torch.arange(groups * k, device=log_weights.device)
            resampled = torch.zeros(groups, dtype=torch.bool, device=log_weights.device)
        else:
            assert self.ess_threshold is not None
            ancestors, log_weights, resampled = resample_adaptively(
                log_weights, uniforms, self.ess_threshold, self.scheme
            )
        trace.log_weights = log_weights
        trace.records.append(ResamplingRecord(ctx.index, ess, resampled, ancestors + ctx.rows.start))
        ctx.run.reindex(ancestors)
        trace.spent = trace.spent.index_select(0, ancestors)
        trace.running = trace.running.index_select(0, ancestors)
        trace.rewards = r.index_select(0, ancestors)
        return out.index_select(0, ancestors.to(out.device))
