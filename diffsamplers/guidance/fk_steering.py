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

**Particles.** Groups of K consecutive rows, the weighting schedule (every ``interval``-th evaluation at normalised
time ≤ ``start``, and the last), resampling (always, the paper's default, or where ESS < ``ess_threshold``·K, the
weights kept otherwise — a proper SMC; the official code drops them) and the streams are those of
:mod:`diffsamplers.guidance.particles`. The sampler must be stochastic (e.g. SDE-DPM-Solver++ or DDIM with η = 1:
a deterministic one keeps duplicates identical, the paper's pitfall). With λ = 0 and systematic resampling every
weight is equal and every ancestor is the identity: the samples are exactly the unsteered sampler's.

**Gradient proposal** (the paper's Sec. 3, "proposal generators": any sampler may propose the particles as long
as the weights carry the ratio of transition densities). With ``gradient_scale`` s > 0 the particles move by a
reward-gradient-guided sampler instead of the base one: at each stochastic step the ``guide_x0`` hook replaces the
model's x̂0 by

    x̂0' = x̂0 + s · σ_t²/α_t · ∇ₓ r(x̂0(x))    (``gradient_form="score"``, the default), or
    x̂0' = x̂0 + s · ∇ₓ r(x̂0(x))              (``gradient_form="x0"``),

the reward differentiated through the model's x̂0 with respect to the sample x (the step's model call keeps its
graph there, :meth:`FKSteering.needs_grad_at`; the reward must be differentiable — otherwise a ``ValueError`` names
it). The score form adds s·∇ₓ r(x̂0) to the score (ε̂ ← ε̂ − s σ_t ∇ₓ r, the form of universal/reconstruction
guidance): by Tweedie's formula the tilted target's x̂0 at level t is x̂0 + (σ_t²/α_t) ∇ₓ log E[exp(λ r(x0)) | x_t]
≈ x̂0 + λ (σ_t²/α_t) ∇ₓ r(x̂0), so s of the order of λ (less where the posterior of x0 is wide: at high noise
E[exp(λ r)] is flatter than exp(λ r(x̂0))) brings the proposal close to the target (measured on the tests' 1-D
mixture at λ = 2, K = 64: s = 0.5 raises the mean ESS before resampling from 43.5 to 55.6, s = 2 lowers it to ≈ 33:
the weights then degenerate mid-way). The x0 form is the plain shift
with a constant s: near the data σ_t → 0 it still moves x̂0 by s·∇r while the target's shift vanishes and the step's
noise c → 0, so its log-weight increments grow like (s∇r/c)² — exact, but the ESS falls (measured on the same
mixture: below the base sampler's for every s in {0.01, 0.03, 0.1, 0.3, 1}), hence not the default. The
intermediate potentials read the stored, guided x̂0' (any function of the path will do: the final correction
restores Π G = exp(λ r(x0))).

A step of the solvers is Gaussian, x' = m + c·z with z ~ N(0, I), c the step's noise coefficient and m linear in the
stored x̂0 (``history[j]`` the coefficient of the j-th newest). The guided mean is m' = m + δ with

    δ = Σ_j history[j] · (x̂0'_{k−j} − x̂0_{k−j}),

and the SMC weights of the proposal τ(x'|x) = N(x'; m', c²I) against the base p_θ(x'|x) = N(x'; m, c²I) carry, at
EVERY step (not only at the weighting steps: the increments accumulate until the next resampling),

    log p_θ(x'|x) − log τ(x'|x) = (‖x' − m'‖² − ‖x' − m‖²) / (2c²) = −Σ (2e + δ)·δ / (2c²),   e = x' − m' = c·z,

summed over the sample's dimensions in float64 (m' replayed from the solver state with zero noise). This is exact
for single-step stochastic solvers (DDIM with η > 0, Euler–Maruyama, SDE-DPM-Solver++ of order 1), and — because
each particle carries its shifts x̂0' − x̂0 of the steps still in the solver's history (gathered on resampling) —
for the multistep SDE-DPM-Solver++ too: its base mean m uses the unguided x̂0 of the older steps (the solver state
holds the guided ones), so multistep solvers are supported, not approximated. Where the solver thresholds x̂0
(``x0_transform``), the shift is the one of the stored predictions, T(x̂0') − T(x̂0).

**Deterministic steps are not guided.** A step with c = 0 (the last step, to σ = 0) has no transition density: its
result is a fixed function of the path and cannot be re-weighted. There x̂0 is left unchanged and, for multistep
solvers, the result is moved back by the δ of the older guided x̂0 (x' − δ = m), so that the step is exactly the
base sampler's map and the product of the weights still targets p_θ(x0)·exp(λ r(x0)) exactly; guiding it would
bias the returned samples by a shift no weight accounts for. (The last steps of DDIM, Euler–Maruyama and
SDE-DPM-Solver++ are first order, x' = x̂0, so there δ = 0; the move back matters for a higher-order deterministic
step.)

Refused with ``gradient_scale`` > 0 (``ValueError``): steps with a corrector (UniPC) or a compensation (DC-Solver)
and solvers that move samples off the plan's grid (the exposure-bias time shift) — their transitions are not of the
form above. FK steering should be the last guidance in a sequence that changes x̂0 (a later one would change the
base and the proposal differently). Any s is exact as K grows (the weights correct the proposal); a proposal far
from the target (s too large) only lowers the ESS.

**Cost and host reads.** The potentials' reward runs under ``torch.no_grad`` (any callable, differentiable or not
without the gradient proposal) once per resampling step on the whole batch; log-weights are float64 on the device. Checking the reward for NaN/Inf and
the resampler's own checks read the device once per resampling step. The gradient proposal costs one backward
through the reward and the model per stochastic step, a replay of the update's linear combination and the carried
shifts (one sample-sized tensor per stored x̂0); it reads nothing back (a NaN gradient surfaces through the run's
NaN check of x̂0). Not for DC-Solver's ratio search (its trial steps would advance the particles' weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..solvers.base import Solver, SolverPlan
from ..step import Move, StepContext
from .particles import ParticleGroups, ParticleGuidance, ResamplingRecord
from .rewards import checked_score

__all__ = ["GRADIENT_FORMS", "POTENTIALS", "FKSteering", "ResamplingRecord", "log_potential"]

#: The potentials :class:`FKSteering` knows.
POTENTIALS = ("difference", "max", "sum")

#: The forms of :class:`FKSteering`'s gradient proposal (module docstring, "Gradient proposal").
GRADIENT_FORMS = ("score", "x0")


def log_potential(
    potential: str, lam: float, reward: torch.Tensor, carried: dict[str, torch.Tensor], final: bool
) -> torch.Tensor:
    """The log-potential log G_k of FK steering (Singhal et al. 2025, Sec. 3.2) for the rewards ``reward``
    (``(B,)``, float64), updating the per-particle quantities in ``carried``: the ``running`` reward (the last one,
    the running maximum or the running sum), the log-potential ``spent`` along the path so far and the latest
    ``rewards``. ``"difference"``: λ (r_k − r_{k'}); ``"max"``: λ max_{j ≤ k} r_j; ``"sum"``: λ Σ_{j ≤ k} r_j; at the
    final step λ r(x0) − Σ log G, so that the product of the potentials along a path is exp(λ r(x0))."""
    spent = carried.get("spent", torch.zeros_like(reward))
    if final:
        log_g = lam * reward - spent
    else:
        if potential == "difference":
            running = reward
            log_g = lam * reward - spent
        elif potential == "max":
            running = torch.maximum(carried["running"], reward) if "running" in carried else reward
            log_g = lam * running
        else:
            running = carried["running"] + reward if "running" in carried else reward
            log_g = lam * running
        carried["running"] = running
    carried["spent"] = spent + log_g
    carried["rewards"] = reward
    return log_g


class FKSteering(ParticleGuidance):
    """FK steering (Singhal et al. 2025) towards p_θ(x0)·exp(λ r(x0)) with K particles per group.

    Args:
        reward: per-sample reward r of a batch of clean samples ``(B, *shape) → (B,)``; any callable (evaluated
            under ``torch.no_grad``).
        num_particles: K, the particles per group (consecutive rows).
        lam: λ ≥ 0, the inverse temperature of the tilt (λ = 0: the base distribution).
        potential: ``"difference"``, ``"max"`` or ``"sum"`` (module docstring).
        interval, start, ess_threshold, scheme, resample_final: the weighting schedule and the resampling
            (:class:`~diffsamplers.guidance.particles.ParticleGuidance`); ``start`` < 1 skips the first, noisiest
            steps, where x̂0's reward is uninformative (the paper starts late).
        gradient_scale: s ≥ 0 (finite): propose the particles by reward-gradient guidance at every stochastic step
            and carry the ratio of transition densities in the weights (module docstring, "Gradient proposal"); 0
            (default) proposes with the base sampler. The reward must then be differentiable.
        gradient_form: ``"score"`` — x̂0' = x̂0 + s·σ_t²/α_t·∇ₓ r(x̂0(x)) (s ≈ λ or less: Tweedie's tilted x̂0) — or
            ``"x0"`` — x̂0' = x̂0 + s·∇ₓ r(x̂0(x)).

    After sampling, :attr:`history` lists one :class:`ResamplingRecord` per weighting step (per chunk),
    :attr:`log_weights` holds each particle's final log-weight (0 after a final resampling) and :attr:`rewards`
    the final reward of every returned particle — in the order of the rows of the output.
    """

    stream = "fk-steering"

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
        gradient_scale: float = 0.0,
        gradient_form: str = "score",
    ):
        if not callable(reward):
            raise TypeError(f"reward must be callable, got {type(reward).__name__}")
        lam = float(lam)
        if not lam >= 0.0 or lam == float("inf"):
            raise ValueError(f"the inverse temperature λ must be finite and ≥ 0, got {lam!r}")
        if potential not in POTENTIALS:
            raise ValueError(f"unknown potential {potential!r}: expected one of {POTENTIALS}")
        scale = math.nan if isinstance(gradient_scale, bool) else gradient_scale
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            scale = math.nan
        if not (math.isfinite(scale) and scale >= 0.0):
            raise ValueError(f"gradient_scale must be a finite number ≥ 0, got {gradient_scale!r}")
        if gradient_form not in GRADIENT_FORMS:
            raise ValueError(f"unknown gradient_form {gradient_form!r}: expected one of {GRADIENT_FORMS}")
        super().__init__(
            num_particles,
            interval=interval,
            start=start,
            ess_threshold=ess_threshold,
            scheme=scheme,
            resample_final=resample_final,
        )
        self.reward = reward
        self.lam = lam
        self.potential = potential
        self.gradient_scale = scale
        self.gradient_form = gradient_form
        # (run, index, x̂0 before the shift, the shift s·∇ₓr) of the step whose guide_x0 ran last, for its transition.
        self._pending: tuple[object, int, torch.Tensor, torch.Tensor] | None = None

    @property
    def rewards(self) -> torch.Tensor | None:
        """The reward of each returned particle ``(N,)`` (float64); ``None`` before sampling."""
        return self.carried("rewards")

    @property
    def reward_name(self) -> str:
        return getattr(self.reward, "__name__", type(self.reward).__name__)

    # -- the gradient proposal ------------------------------------------------------------------
    def guided(self, plan: SolverPlan, index: int) -> bool:
        """Whether the gradient proposal acts at evaluation ``index`` of ``plan``: ``gradient_scale`` > 0 and the step
        injects noise (a deterministic step, c = 0, cannot be re-weighted and stays the base sampler's)."""
        return self.gradient_scale > 0.0 and plan.steps[index].noise != 0.0

    def proposal_steps(self, plan: SolverPlan) -> list[int]:
        """The evaluations of ``plan`` at which the gradient proposal acts (every stochastic one, or none)."""
        return [k for k in range(plan.num_evals) if self.guided(plan, k)]

    def needs_grad_at(self, ctx: StepContext) -> bool:
        """The step's model call keeps its graph to x exactly where the proposal acts."""
        return self.guided(ctx.plan, ctx.index)

    def _check_solver(self, ctx: StepContext) -> None:
        solver, step = ctx.run.solver, ctx.plan.steps[ctx.index]
        why = None
        if step.corrector is not None:
            why = "its steps apply a corrector"
        elif step.compensation:
            why = "its steps compensate x̂0"
        elif type(solver).evaluation_point is not Solver.evaluation_point:
            why = "it moves samples off the plan's grid"
        if why is not None:
            raise ValueError(
                f"FK steering's gradient proposal (gradient_scale={self.gradient_scale:g}) needs a Gaussian step that "
                f"is linear in x̂0, but {solver.name} is not one ({why}); use e.g. ddim-eta1, sde-dpm++2m or "
                "euler-maruyama, or gradient_scale=0"
            )

    def guide_x0(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x̂0' = x̂0 + s·(σ_t²/α_t)·∇ₓ r(x̂0(x)) (score form) or x̂0 + s·∇ₓ r(x̂0(x)) at a stochastic step (the
        proposal); the shift is kept for the transition."""
        if not self.guided(ctx.plan, ctx.index):
            return x0
        self._check_solver(ctx)
        name = self.reward_name
        if not x0.requires_grad:
            raise ValueError(
                "FK steering's gradient proposal needs ∇ₓ x̂0, but the model's x̂0 has no autograd graph to x "
                "(a model run under torch.no_grad or detached cannot propose by gradient); use gradient_scale=0"
            )
        hint = (
            "make it differentiable (torch operations on its input, no .detach()/no_grad/NumPy) or use gradient_scale=0"
        )
        try:
            r = self.reward(x0)
        except RuntimeError as error:
            raise ValueError(
                f"FK steering's gradient proposal differentiates the reward {name!r}, which failed under autograd "
                f"({error}); {hint}"
            ) from error
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (x0.shape[0],):
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"the reward {name!r} must return a tensor of shape ({x0.shape[0]},), got {got}")
        if not r.requires_grad:
            raise ValueError(
                f"FK steering's gradient proposal differentiates the reward {name!r}, but its output has no "
                f"autograd graph to its input; {hint}"
            )
        try:
            (grad,) = torch.autograd.grad(r.sum(), x, retain_graph=True, allow_unused=True)
        except RuntimeError as error:
            raise ValueError(
                f"FK steering's gradient proposal could not differentiate the reward {name!r} ({error}); {hint}"
            ) from error
        if grad is None:
            raise ValueError(
                f"FK steering's gradient proposal: the reward {name!r} of x̂0 does not depend on the sample x "
                "through autograd"
            )
        scale = self.gradient_scale
        if self.gradient_form == "score":  # σ_t²/α_t: host floats (solvers off the grid are refused)
            scale = scale * ctx.sigma * ctx.sigma / ctx.alpha
        shift = (scale * grad.detach()).to(x0.dtype)
        self._pending = (ctx.run, ctx.index, x0.detach(), shift)
        return x0 + shift

    def _propose(self, ctx: StepContext, move: Move, groups: ParticleGroups) -> torch.Tensor:
        """The transition's share of the gradient proposal: carry this step's shift of the stored x̂0, then add the
        log-ratio of the base and the guided Gaussian steps to the weights (stochastic step) or move a deterministic
        step's result back to the base sampler's (module docstring). Returns the step's result."""
        pending, self._pending = self._pending, None
        history = move.state_before.history
        if not history:
            raise ValueError(
                "FK steering's gradient proposal needs the step's x̂0 in the solver state, and there is none"
            )
        newest = history[-1]
        if pending is not None and pending[0] is ctx.run and pending[1] == ctx.index:
            x0, shift = pending[2].to(newest.dtype), pending[3].to(newest.dtype)
            transform = ctx.run.solver.x0_transform
            if transform is not None:  # the stored predictions are thresholded: their shift
                shift = transform(x0 + shift) - transform(x0)
        else:  # an unguided (deterministic) step
            shift = torch.zeros_like(newest)
        carried = groups.carried
        shifts = carried.get("shifts")  # (B, n, *shape), aligned with the solver's history (oldest first)
        shifts = shift.unsqueeze(1) if shifts is None else torch.cat([shifts, shift.unsqueeze(1)], dim=1)
        carried["shifts"] = shifts = shifts[:, -len(history) :]
        c = move.c
        terms = [(h, shifts[:, -1 - j]) for j, h in enumerate(c.history[: shifts.shape[1]]) if h != 0.0]
        out = move.result
        if not terms:
            return out
        delta = terms[0][1].to(torch.float64) * terms[0][0]
        for h, t in terms[1:]:
            delta = delta + h * t.to(torch.float64)
        if c.noise == 0.0:  # x' = m' exactly: x' − δ = m, the base sampler's step
            return (out.to(torch.float64) - delta).to(out.dtype)
        zero = torch.zeros_like(move.x)
        mean = ctx.run.solver.advance(ctx.plan, move.state_before.copy(), ctx.index, c, move.x, zero)
        e = (out - mean).to(torch.float64).flatten(1)
        d = delta.flatten(1)
        groups.reweight(-((2.0 * e + d) * d).sum(1) / (2.0 * c.noise * c.noise))
        return out

    def transition(self, ctx: StepContext, move: Move) -> torch.Tensor:
        """Weight the particles at a weighting step and resample them (with the solver state and conditions); with
        the gradient proposal, weight every step by the ratio of the base and the proposal transitions first."""
        out = move.result
        groups = self.groups(ctx, out.device)
        if self.gradient_scale > 0.0:
            out = self._propose(ctx, move, groups)
        if not self.is_weighting_step(ctx.index, ctx.num_evals, ctx.time):
            return out
        final = ctx.index == ctx.num_evals - 1
        if final:
            r = checked_score(self.reward, (out,), ctx, "the reward", "the returned sample")
        else:
            history = move.state_before.history
            if not history:
                raise ValueError("FK steering needs the step's x̂0 in the solver state, and there is none")
            r = checked_score(self.reward, (history[-1],), ctx, "the reward", "x̂0")
        groups.reweight(log_potential(self.potential, self.lam, r, groups.carried, final))
        return self.weigh_and_resample(ctx, groups, out)
