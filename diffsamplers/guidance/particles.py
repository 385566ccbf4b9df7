"""Particles: groups of K weighted samples in one batch, the sequential Monte Carlo bookkeeping shared by the
particle methods (FK steering, Singhal et al. 2025; Feynman–Kac correctors, Skreta et al. 2025) and the diffusers
callback (:mod:`diffsamplers.adapters.particle_callback`).

**Groups.** Consecutive rows form a group of K particles (one group per prompt, class or sample): rows
g·K … g·K + K − 1 are the particles of group g and resample among themselves only
(:mod:`diffsamplers.guidance.resampling`). A group is never split across chunks of ``sample(...,
batch_size=...)``: the batch size must be a multiple of K (checked, ``ValueError``).

**Weights.** :class:`ParticleGroups` holds one chunk's log-weights ``(G, K)`` in float64 on the device (the weights
accumulated since the last resampling), the per-particle quantities a method carries along a path (gathered with the
particles), and one :class:`ResamplingRecord` per weighting step: the ancestry. Resampling is always (the papers'
default) or only where the effective sample size falls below a threshold·K; weights not resampled are carried to
the next weighting step (a proper SMC). All weights −∞ in a group raise an error (no silent uniform reset).

**Schedule.** :class:`ParticleGuidance` weights at every ``interval``-th evaluation whose normalised time
(:attr:`~diffsamplers.step.StepContext.time`, 1 = noise) is at most ``start``, and at the last evaluation, where
every group resamples (``resample_final=True``) so that the returned particles follow the target without weights.

**Randomness.** The uniforms of a group's resampling come from the first row of the group's own stream
(:meth:`~diffsamplers.step.StepContext.noise`, one key per method): N(0, 1) draws mapped to [0, 1) by the normal
CDF, so a group's resampling does not depend on the batch it ran in. After resampling, the sample, the solver state
and the conditions are gathered with the ancestors (:meth:`~diffsamplers.step.SamplingRun.reindex`), while each
row keeps its own random stream: a duplicated particle does not replay its ancestor's future noise, so duplicates
diverge again. That needs a stochastic sampler (SDE-DPM-Solver++, DDIM with η > 0, Euler–Maruyama): with a
deterministic one duplicates stay identical, and a particle method refuses it (``ValueError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..solvers.base import SolverPlan
from ..step import Guidance, StepContext, normalised_time
from .resampling import SCHEMES, effective_sample_size, resample, resample_adaptively

__all__ = ["ParticleGroups", "ParticleGuidance", "ResamplingRecord", "check_count", "group_uniforms"]


def check_count(name: str, value: object) -> int:
    """``value`` as an integer ≥ 1 (a particle or candidate count, an interval), else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return int(value)


def group_uniforms(ctx: StepContext, key: str, group_size: int, columns: int, device: torch.device) -> torch.Tensor:
    """``(B / group_size, columns)`` uniforms in [0, 1): each group's first row's N(0, 1) draws from stream ``key``
    through the normal CDF (float64), so a group's draws do not depend on the batch it ran in."""
    z = ctx.noise(key, (columns,), device, torch.float64)[::group_size]
    return torch.special.ndtr(z).clamp_(max=1.0 - 2.0**-53)


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
class ParticleGroups:
    """The particles of one chunk (global rows ``rows``) in groups of ``num_particles``: float64 log-weights
    ``(G, K)`` since the last resampling, the per-particle tensors a method carries (``carried``, gathered on
    resampling) and the records of the weighting steps."""

    rows: range
    num_particles: int
    log_weights: torch.Tensor
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[ResamplingRecord] = field(default_factory=list)

    @classmethod
    def start(cls, rows: range, num_particles: int, device: torch.device, method: str = "particles") -> ParticleGroups:
        """Fresh groups for ``rows`` (equal weights); ``ValueError`` if the rows do not hold whole groups."""
        k = num_particles
        if len(rows) % k != 0 or rows.start % k != 0:
            raise ValueError(
                f"{method} needs whole groups of num_particles={k} consecutive rows in a batch: got rows "
                f"{rows.start}…{rows.stop - 1}; make the batch size a multiple of {k}"
            )
        zeros = torch.zeros(len(rows) // k, k, dtype=torch.float64, device=device)
        return cls(rows, k, zeros)

    def reweight(self, log_increment: torch.Tensor) -> None:
        """Multiply each particle's weight by exp(``log_increment``) (``(B,)``, accumulated in float64)."""
        self.log_weights = self.log_weights + log_increment.to(torch.float64).view_as(self.log_weights)

    def resample(
        self,
        index: int,
        uniforms: torch.Tensor,
        scheme: str,
        ess_threshold: float | None = None,
        force: bool = False,
    ) -> torch.Tensor:
        """Resample (every group if ``force`` or no threshold, else where ESS < ``ess_threshold``·K), record it,
        gather :attr:`carried`; returns the ancestors as local rows ``(B,)`` for the caller to gather the rest."""
        log_weights = self.log_weights
        groups, k = log_weights.shape
        ess = effective_sample_size(log_weights)
        if force or ess_threshold is None:
            ancestors = resample(log_weights, uniforms, scheme)
            self.log_weights = torch.zeros_like(log_weights)
            resampled = torch.ones(groups, dtype=torch.bool, device=log_weights.device)
        else:
            ancestors, self.log_weights, resampled = resample_adaptively(log_weights, uniforms, ess_threshold, scheme)
        self.records.append(ResamplingRecord(index, ess, resampled, ancestors + self.rows.start))
        self.carried = {name: t.index_select(0, ancestors.to(t.device)) for name, t in self.carried.items()}
        return ancestors

    def keep(self, index: int) -> None:
        """Record a weighting step that does not resample (the weights stay for the caller)."""
        groups, k = self.log_weights.shape
        ess = effective_sample_size(self.log_weights)
        identity = torch.arange(groups * k, device=self.log_weights.device)
        self.records.append(
            ResamplingRecord(index, ess, torch.zeros_like(ess, dtype=torch.bool), identity + self.rows.start)
        )


class ParticleGuidance(Guidance):
    """The base of the particle methods: K particles per group, a weighting schedule, resampling, the records.

    A subclass adds log-weight increments to the chunk's :class:`ParticleGroups` (:meth:`groups`) and calls
    :meth:`weigh_and_resample` from its ``transition`` hook. After sampling, :attr:`history` lists the weighting
    steps (:class:`ResamplingRecord`, chunk after chunk) and :attr:`log_weights` the final log-weights ``(G, K)``.

    Args:
        num_particles: K, the particles per group (consecutive rows).
        interval: weight and resample at every ``interval``-th evaluation (and at the last).
        start: weight only at evaluations with normalised time ≤ ``start`` (1: from the first).
        ess_threshold: ``None`` resamples at every weighting step; a value in (0, 1] only where ESS < value·K.
        scheme: the resampling scheme (:data:`~diffsamplers.guidance.resampling.SCHEMES`).
        resample_final: resample every group at the last evaluation (otherwise its weights are only recorded).
    """

    #: The key of the resampling uniforms' stream (one per method).
    stream = "particles"

    def __init__(
        self,
        num_particles: int,
        *,
        interval: int = 1,
        start: float = 1.0,
        ess_threshold: float | None = None,
        scheme: str = "systematic",
        resample_final: bool = True,
    ):
        self.num_particles = check_count("num_particles", num_particles)
        self.interval = check_count("interval", interval)
        if not 0.0 <= float(start) <= 1.0:
            raise ValueError(f"start is a normalised time in [0, 1], got {start!r}")
        if ess_threshold is not None and not 0.0 < float(ess_threshold) <= 1.0:
            raise ValueError(f"the ESS threshold must lie in (0, 1], got {ess_threshold!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown resampling scheme {scheme!r}: expected one of {SCHEMES}")
        self.start = float(start)
        self.ess_threshold = None if ess_threshold is None else float(ess_threshold)
        self.scheme = scheme
        self.resample_final = bool(resample_final)
        self._groups: list[ParticleGroups] = []

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
        return [r for g in self._groups for r in g.records]

    @property
    def log_weights(self) -> torch.Tensor | None:
        """The particles' final log-weights ``(groups, K)`` (float64), all chunks; ``None`` before sampling."""
        if not self._groups:
            return None
        return torch.cat([g.log_weights for g in self._groups], dim=0)

    def carried(self, name: str) -> torch.Tensor | None:
        """A carried per-particle tensor over all chunks (rows of the output), ``None`` if a chunk lacks it."""
        if not self._groups or any(name not in g.carried for g in self._groups):
            return None
        return torch.cat([g.carried[name] for g in self._groups], dim=0)

    # -- the machinery --------------------------------------------------------------------------
    def groups(self, ctx: StepContext, device: torch.device) -> ParticleGroups:
        """The current chunk's particles, started at its first evaluation (checks the groups and that the sampler
        is stochastic)."""
        rows = ctx.rows
        if ctx.index == 0 or not self._groups or self._groups[-1].rows != rows:
            if not ctx.plan.stochastic:
                raise ValueError(
                    f"{type(self).__name__} resamples particles, which needs a stochastic sampler (duplicates of a "
                    f"deterministic one never diverge): {ctx.run.solver.name} takes no random step; use e.g. "
                    "sde-dpm++2m, ddim-eta1 or euler-maruyama"
                )
            self.start_groups(rows, device, new_call=ctx.index == 0 and rows.start == 0)
        return self._groups[-1]

    def start_groups(self, rows: range, device: torch.device, new_call: bool = True) -> ParticleGroups:
        """Start and record the particles of the chunk ``rows`` (``new_call``: a new sampling call, whose records
        replace the last one's), for :attr:`history`, :attr:`log_weights` and :meth:`carried`; for loops outside
        the diffusion step (the masked samplers, :mod:`diffsamplers.guidance.masked`). ``ValueError`` if the rows do
        not hold whole groups."""
        groups = ParticleGroups.start(rows, self.num_particles, device, type(self).__name__)
        if new_call:
            self._groups = []
        self._groups.append(groups)
        return groups

    def weigh_and_resample(self, ctx: StepContext, groups: ParticleGroups, out: torch.Tensor) -> torch.Tensor:
        """At a weighting step: resample (always, or by ESS; every group at the last step if ``resample_final``),
        then gather the solver state and conditions (:meth:`SamplingRun.reindex`) and return the gathered sample;
        the last step without ``resample_final`` only records the weights."""
        final = ctx.index == ctx.num_evals - 1
        if final and not self.resample_final:
            groups.keep(ctx.index)
            return out
        uniforms = group_uniforms(ctx, self.stream, self.num_particles, self.num_particles, out.device)
        threshold = None if final else self.ess_threshold
        ancestors = groups.resample(ctx.index, uniforms, self.scheme, threshold, force=final)
        ctx.run.reindex(ancestors)
        return out.index_select(0, ancestors.to(out.device))
