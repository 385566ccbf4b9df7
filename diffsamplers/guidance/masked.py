"""FK steering and SVDD on the masked samplers: the same :class:`~diffsamplers.guidance.fk_steering.FKSteering` and
:class:`~diffsamplers.guidance.svdd.SVDD` objects as for continuous models, driving the MDLM ancestral sampler and the
first-hitting sampler of :mod:`diffsamplers.masked` (Zheng et al. 2024, arXiv:2409.02908).

``GuidedMaskedSampler(sampler, guidance).sample(diffusion, ...)`` takes the arguments of the sampler's own ``sample``
and returns a :class:`~diffsamplers.masked.samplers.MaskedSample`. The step functions
(:func:`~diffsamplers.masked.samplers.ancestral_step`, :func:`~diffsamplers.masked.samplers.first_hitting_step`),
the particle bookkeeping (:class:`~diffsamplers.guidance.particles.ParticleGroups`), the potentials
(:func:`~diffsamplers.guidance.fk_steering.log_potential`), the selection
(:func:`~diffsamplers.guidance.svdd.select_candidates`) and the checked reward call
(:func:`~diffsamplers.guidance.rewards.checked_score`) are the shared ones; this module is the loop. (It sits at
the guidance layer because it reads the guidance classes; the masked samplers know nothing of it.)

**x̂0 of a masked state** (the SVDD and FK-steering practice for masked text models; Li et al. 2024,
arXiv:2408.08252, Sec. 4, SVDD-PM on MDLM): every masked position takes the argmax of p_θ(x0^i | x_t), unmasked
tokens are copied (:func:`argmax_x0`). A reward is any callable ``(B, L) int64 tokens → (B,)``.

**FK steering** (Singhal et al. 2025, arXiv:2501.06848, Alg. 1) towards p_θ(x0)·exp(λ r(x0)): groups of K
consecutive rows are the particles. At step ``index`` of ``num_steps`` whose input time is ``time`` — the ancestral
grid's t_k; for the first-hitting sampler the largest of the rows' own times (one host read per step, made only when
``start`` < 1) — ``fk.is_weighting_step(index, num_steps, time)`` decides whether the particles are weighted: by
the reward of x̂0 of the step's result (one model call on the new state, at its time; the next step reuses it where
it is that step's model call — always for the ancestral sampler, for a time-agnostic model with the first-hitting
sampler), through the potential (``difference``, ``max``, ``sum``), and at the last step by the reward of the
returned (clean) sample, so the potentials along a path multiply to exp(λ r(x0)). Then every group resamples
(or, with ``ess_threshold``, those whose ESS fell below it; the last step always resamples unless
``resample_final=False``), and the tokens and the sampler's per-row state — the first-hitting sampler's time t
(its masked count is read off the tokens), the cached model output — are gathered with the ancestors. After
sampling ``fk.history``, ``fk.log_weights`` and ``fk.rewards`` are those of this call, as for continuous models.
The gradient proposal (``gradient_scale`` > 0) has no meaning on tokens: refused.

**SVDD** (Li et al. 2024, Alg. 1): at each step M candidates of the next state per row, by replaying the sampler's
step M times from the same model output — the ancestral step's race over every position of the M copies, or the
first-hitting step's times, positions and tokens (``first_hitting_step(..., candidates=M)``) — valued by the
estimator and one kept by :func:`select_candidates` (the argmax at α = 0, a draw ∝ exp(v̂/α) at α > 0) with its
per-row state. Values: ``"pm"`` — r(x̂0) of each candidate, from one model call on the B·M candidates (in
``value_chunk`` rows); ``"mc"`` — α log mean_j exp(r(x0^{(j)})/α) over ``rollouts`` rollouts of the plain sampler
from each candidate to the end (the mean reward at α = 0), all in one batch; the ancestral rollouts take
``rollout_steps`` of the remaining grid levels (``svdd.rollout_levels``), the first-hitting rollouts all their
remaining steps (``rollout_steps`` is refused there); a callable ``value(x, t)`` — ``x`` the ``(B·M, L)``
candidates, ``t`` their times ``(B·M,)`` float64. At the last step (no mask left) every estimator is the reward
itself. M = 1 is the plain sampler bit for bit (no value is computed). ``svdd.history`` holds an
:class:`~diffsamplers.guidance.svdd.SVDDRecord` per step with M > 1 (its ``sigma`` is the candidates' time on the
ancestral grid, NaN for the first-hitting sampler, whose rows have their own times).

**Randomness.** The sampler's draws come from ``generator`` in the plain sampler's order. The guidance's own draws
— FK's resampling uniforms ``(G, K)`` per resampling step, SVDD's selection uniforms ``(B,)`` per step at α > 0 and
the MC rollouts — come from ``guidance_generator``, or, if it is ``None``, from ``generator`` after the step's
draws. With a separate ``guidance_generator``, FK steering at λ = 0 with systematic resampling (equal weights:
every particle is its own ancestor) returns the plain sampler's tokens bit for bit. As with the plain masked
samplers, one stream serves the whole batch: a row's draws depend on the batch it ran in.

**Cost and host reads**: ``nfe`` counts every model call, those on the B·M candidates or the rollouts included.
Each reward or value call reads the device once (its NaN check, which names the reward and the step); the
resampler's checks read it once per resampling step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..masked.samplers import (
    AncestralSampler,
    FirstHittingSampler,
    MaskedDiffusion,
    MaskedSample,
    ancestral_step,
    first_hitting_step,
    start_state,
)
from .fk_steering import FKSteering, log_potential
from .rewards import checked_score
from .svdd import SVDD, SVDDRecord, select_candidates

__all__ = ["GuidedMaskedSampler", "MaskedStepInfo", "argmax_x0"]


def argmax_x0(diffusion: MaskedDiffusion, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """x̂0 of a masked state: the argmax of the model's ``logits`` ``(B, L, V)`` at every masked position of ``x``,
    the unmasked tokens copied (SVDD-PM's x̂0 for masked models, Li et al. 2024, Sec. 4)."""
    return torch.where(x == diffusion.mask, logits.argmax(dim=-1), x)


@dataclass(frozen=True)
class MaskedStepInfo:
    """Where a guided masked loop is, for the messages of :func:`checked_score`: step ``index`` (0-based) of
    ``num_evals`` on the batch's global ``rows``."""

    index: int
    num_evals: int
    rows: range


class _Chain:
    """A masked sampler's run, split where the guidance acts: propose (M copies), value, commit, gather."""

    def __init__(self, diffusion: MaskedDiffusion, x: torch.Tensor, generator: torch.Generator | None):
        self.diffusion, self.x, self.generator = diffusion, x, generator
        self.nfe = 0
        self.changed = torch.zeros((), dtype=torch.int64, device=x.device)

    num_steps: int

    def logits_at(self, x: torch.Tensor, t: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """One model call (counted) on ``x`` at the times ``t`` ``(n,)``, in chunks of ``chunk`` rows."""
        self.nfe += 1
        step = x.shape[0] if chunk is None else chunk
        parts = [
            self.diffusion.logits(x[i : i + step], t[i : i + step].to(torch.float32))
            for i in range(0, x.shape[0], step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _AncestralChain(_Chain):
    def __init__(self, sampler: AncestralSampler, diffusion, x, generator, start_time: float):
        super().__init__(diffusion, x, generator)
        self.num_steps = sampler.steps
        self.times = [start_time * (1.0 - k / sampler.steps) for k in range(sampler.steps + 1)]
        self.masks = [diffusion.schedule.mask_probability(t) for t in self.times]
        self.caching = sampler.cache and not diffusion.time_conditioned
        self.probs: torch.Tensor | None = None  # p_θ(· | x) at the current time, float64, when known

    def time(self, index: int) -> float:
        return self.times[index]

    def step(self, index: int, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x
        if self.probs is None:
            t = torch.full((x.shape[0],), self.times[index], dtype=torch.float32, device=x.device)
            self.probs = torch.softmax(self.diffusion.logits(x, t).to(torch.float64), dim=-1)
            self.nfe += 1
        probs = self.probs
        if copies > 1:
            x, probs = x.repeat_interleave(copies, dim=0), probs.repeat_interleave(copies, dim=0)
        m_t, m_s = self.masks[index], self.masks[index + 1]
        out = ancestral_step(self.diffusion, x, probs, m_t, m_s, self.generator)
        return out, self.after(index, out.shape[0], x.device)

    def after(self, index: int, rows: int, device: torch.device) -> torch.Tensor:
        """The times ``(rows,)`` (float64) of a state after step ``index``."""
        return torch.full((rows,), self.times[index + 1], dtype=torch.float64, device=device)

    def commit(self, x: torch.Tensor, t: torch.Tensor, logits: torch.Tensor | None) -> None:
        moved = (x != self.x).any()
        self.changed += moved
        if logits is not None:  # the model at the new state and time: the next step's call
            self.probs = torch.softmax(logits.to(torch.float64), dim=-1)
        elif not (self.caching and not bool(moved)):  # the plain sampler's cache rule (its one host read)
            self.probs = None
        self.x = x

    def gather(self, rows: torch.Tensor) -> None:
        self.x = self.x.index_select(0, rows)
        if self.probs is not None:
            self.probs = self.probs.index_select(0, rows)

    def rollout(self, x: torch.Tensor, index: int, svdd: SVDD, generator: torch.Generator | None) -> torch.Tensor:
        """The plain sampler from ``x`` (after step ``index``) to t = 0 on ``svdd.rollout_levels`` of the grid."""
        levels = svdd.rollout_levels(self.num_steps, index + 1).tolist()
        for a, b in zip(levels[:-1], levels[1:]):
            t = torch.full((x.shape[0],), self.times[a], dtype=torch.float64, device=x.device)
            probs = torch.softmax(self.logits_at(x, t, svdd.value_chunk).to(torch.float64), dim=-1)
            x = ancestral_step(self.diffusion, x, probs, self.masks[a], self.masks[b], generator)
        return x


class _FirstHittingChain(_Chain):
    def __init__(self, sampler: FirstHittingSampler, diffusion, x, generator, start_time: float):
        super().__init__(diffusion, x, generator)
        self.k = sampler.tokens_per_step
        most = int((x == diffusion.mask).sum(dim=1).max())  # the plain sampler's one host read
        self.num_steps = math.ceil(most / self.k)
        self.t = torch.full((x.shape[0],), start_time, dtype=torch.float64, device=x.device)
        self.logits: torch.Tensor | None = None  # the model at the current state (time-agnostic models only)

    def time(self, index: int) -> float:
        return float(self.t.max())  # a host read

    def step(self, index: int, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.logits is None:
            self.nfe += 1
        return first_hitting_step(
            self.diffusion, self.x, self.t, self.generator, self.k, candidates=copies, logits=self.logits
        )

    def commit(self, x: torch.Tensor, t: torch.Tensor, logits: torch.Tensor | None) -> None:
        self.x, self.t = x, t
        self.logits = None if self.diffusion.time_conditioned else logits
        self.changed += 1

    def gather(self, rows: torch.Tensor) -> None:
        self.x, self.t = self.x.index_select(0, rows), self.t.index_select(0, rows)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, rows)

    def rollout(self, x: torch.Tensor, t: torch.Tensor, index: int, generator: torch.Generator | None) -> torch.Tensor:
        """The plain sampler from ``x`` at times ``t`` (after step ``index``) to the end."""
        for _ in range(self.num_steps - index - 1):
            self.nfe += 1
            x, t = first_hitting_step(self.diffusion, x, t, generator, self.k)
        return x


@dataclass(frozen=True)
class GuidedMaskedSampler:
    """A masked sampler driven by FK steering or SVDD (see the module docstring).

    Args:
        sampler: an :class:`~diffsamplers.masked.samplers.AncestralSampler` or a
            :class:`~diffsamplers.masked.samplers.FirstHittingSampler`.
        guidance: an :class:`~diffsamplers.guidance.fk_steering.FKSteering` or an
            :class:`~diffsamplers.guidance.svdd.SVDD` (its reward scores ``(B, L)`` token sequences).
    """

    sampler: AncestralSampler | FirstHittingSampler
    guidance: FKSteering | SVDD

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, AncestralSampler | FirstHittingSampler):
            raise ValueError(
                f"a guided masked sampler wraps an AncestralSampler or a FirstHittingSampler, got "
                f"{type(self.sampler).__name__}"
            )
        if not isinstance(self.guidance, FKSteering | SVDD):
            raise ValueError(
                f"the masked samplers take FKSteering or SVDD as guidance, got {type(self.guidance).__name__}"
            )
        if isinstance(self.guidance, FKSteering) and self.guidance.gradient_scale > 0.0:
            raise ValueError(
                f"FK steering's gradient proposal (gradient_scale={self.guidance.gradient_scale:g}) differentiates "
                "the reward in x, which has no meaning for tokens; use gradient_scale=0 with a masked sampler"
            )
        if (
            isinstance(self.guidance, SVDD)
            and self.guidance.value == "mc"
            and self.guidance.rollout_steps is not None
            and isinstance(self.sampler, FirstHittingSampler)
        ):
            raise ValueError(
                f"SVDD's rollout_steps={self.guidance.rollout_steps} sets the steps of an ancestral rollout; a "
                "first-hitting rollout takes one step per tokens_per_step unmasked tokens (use rollout_steps=None)"
            )

    def sample(
        self,
        diffusion: MaskedDiffusion,
        x: torch.Tensor | None = None,
        *,
        batch: int | None = None,
        length: int | None = None,
        generator: torch.Generator | None = None,
        start_time: float = 1.0,
        guidance_generator: torch.Generator | None = None,
    ) -> MaskedSample:
        """Sample as ``sampler.sample`` does, with the guidance; ``guidance_generator``: the stream of the guidance's
        own draws (``None``: ``generator``)."""
        x = start_state(diffusion, x, batch, length, start_time)
        if isinstance(self.sampler, AncestralSampler):
            chain: _AncestralChain | _FirstHittingChain = _AncestralChain(
                self.sampler, diffusion, x, generator, start_time
            )
        else:
            chain = _FirstHittingChain(self.sampler, diffusion, x, generator, start_time)
        own = generator if guidance_generator is None else guidance_generator
        if isinstance(self.guidance, FKSteering):
            _steer(chain, self.guidance, own)
        else:
            _select(chain, self.guidance, own)
        return MaskedSample(chain.x, chain.nfe, chain.num_steps, int(chain.changed))


def _steer(chain: _AncestralChain | _FirstHittingChain, fk: FKSteering, generator: torch.Generator | None) -> None:
    """FK steering's loop (Singhal et al. 2025, Alg. 1) over the masked sampler's steps."""
    x = chain.x
    k_particles = fk.num_particles
    groups = fk.start_groups(range(x.shape[0]), x.device)
    steps = chain.num_steps
    for index in range(steps):
        time = chain.time(index) if fk.start < 1.0 or isinstance(chain, _AncestralChain) else 1.0
        weigh = fk.is_weighting_step(index, steps, time)
        out, t = chain.step(index, 1)
        logits = None
        if weigh:
            where = MaskedStepInfo(index, steps, groups.rows)
            final = index == steps - 1
            if final:
                r = checked_score(fk.reward, (out,), where, "the reward", "the returned sample")
            else:
                logits = chain.logits_at(out, t)
                x0 = argmax_x0(chain.diffusion, out, logits)
                r = checked_score(fk.reward, (x0,), where, "the reward", "x̂0")
            groups.reweight(log_potential(fk.potential, fk.lam, r, groups.carried, final))
        chain.commit(out, t, logits)
        if not weigh:
            continue
        if index == steps - 1 and not fk.resample_final:
            groups.keep(index)
            continue
        g = groups.log_weights.shape[0]
        uniforms = torch.rand(g, k_particles, generator=generator, dtype=torch.float64, device=out.device)
        threshold = None if index == steps - 1 else fk.ess_threshold
        ancestors = groups.resample(index, uniforms, fk.scheme, threshold, force=index == steps - 1)
        chain.gather(ancestors.to(out.device))


def _select(chain: _AncestralChain | _FirstHittingChain, svdd: SVDD, generator: torch.Generator | None) -> None:
    """SVDD's loop (Li et al. 2024, Alg. 1) over the masked sampler's steps."""
    svdd.history = []
    m = svdd.num_candidates
    batch = chain.x.shape[0]
    rows_range = range(batch)
    steps = chain.num_steps
    for index in range(steps):
        out, t = chain.step(index, m)
        if m == 1:
            chain.commit(out, t, None)
            continue
        where = MaskedStepInfo(index, steps, rows_range)
        logits = None
        with torch.no_grad():
            if index == steps - 1:  # no mask left: v_0 = r
                values = checked_score(svdd.reward, (out,), where, "the reward", "candidates at the last step", m)
            elif callable(svdd.value):
                values = checked_score(svdd.value, (out, t), where, "the value", "the candidates", m)
            elif svdd.value == "pm":
                logits = chain.logits_at(out, t, svdd.value_chunk)
                x0 = argmax_x0(chain.diffusion, out, logits)
                values = checked_score(svdd.reward, (x0,), where, "the reward", "x̂0 of the candidates", m)
            else:
                values = _rollout_values(chain, svdd, out, t, index, where, generator)
            values = values.view(batch, m)
            uniforms = None
            if svdd.alpha > 0.0:
                uniforms = torch.rand(batch, generator=generator, dtype=torch.float64, device=values.device)
            chosen = select_candidates(values, svdd.alpha, uniforms)
        keep = torch.arange(batch, device=chosen.device) * m + chosen
        keep = keep.to(out.device)
        chain.commit(
            out.index_select(0, keep), t.index_select(0, keep), None if logits is None else logits.index_select(0, keep)
        )
        level = chain.times[index + 1] if isinstance(chain, _AncestralChain) else math.nan
        svdd.history.append(SVDDRecord(index, level, rows_range, values, chosen))


def _rollout_values(
    chain: _AncestralChain | _FirstHittingChain,
    svdd: SVDD,
    x: torch.Tensor,
    t: torch.Tensor,
    index: int,
    where: MaskedStepInfo,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """SVDD's Monte-Carlo soft value of the candidates ``x``: α log mean exp(r/α) (the mean at α = 0) over
    ``svdd.rollouts`` rollouts of the plain sampler each, in one batch."""
    n = svdd.rollouts
    xs = x.repeat_interleave(n, dim=0)
    if isinstance(chain, _AncestralChain):
        clean = chain.rollout(xs, index, svdd, generator)
    else:
        clean = chain.rollout(xs, t.repeat_interleave(n, dim=0), index, generator)
    per = svdd.num_candidates * n
    r = checked_score(svdd.reward, (clean,), where, "the reward", "the rollouts' final samples", per).view(-1, n)
    if svdd.alpha == 0.0:
        return r.mean(dim=1)
    return svdd.alpha * (torch.logsumexp(r / svdd.alpha, dim=1) - math.log(n))
