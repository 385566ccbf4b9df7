"""Feynman–Kac correctors (Skreta, Akhound-Sadegh, Ohanesian et al., "Feynman-Kac Correctors in Diffusion:
Annealing, Guidance, and Product of Experts", ICML 2025, arXiv:2503.02819) for geometric products of the model's
marginals, as a :class:`~diffsamplers.step.Guidance` (``condition``, ``guide_x0`` and ``transition`` hooks).

**Target.** A weighted geometric product of "experts", the model's marginals under conditions c_i:

    p_t(x) ∝ Π_i q_t(x | c_i)^{β_i}.

Annealing (p ∝ q^β, one expert), a product of experts (p ∝ q(x|c_1) q(x|c_2), β_i = 1) and classifier-free
guidance read as a geometric average (p ∝ q(x)^{1−w} q(x|c)^w) are special cases. Simulating the sampler with the
"target score" Σ_i β_i ∇log q_t(x | c_i) does *not* sample p_0: the product of marginals is not the marginal of the
product. The paper's weighted SDE (eqs. 7, 8) corrects it: along reverse time τ the particles follow
dx = v_τ(x) dτ + ξ σ_τ dW and carry a log-weight dw = g_τ(x) dτ whose Feynman–Kac potential g makes the weighted
particles follow p_t at every τ (eq. 10; the annealing and product/CFG propositions of Sec. 3, numbered 3.2 and
3.3 in the research notes' secondary extraction, not checked against the PDF); sequential
Monte Carlo resampling keeps the weights' variance down.

**Maths, in the VE form of every process.** In y = x/α and σ̃ = σ/α every forward process is dy = √(dσ̃²/dt) dW
(no drift, so no divergence term), and the score of expert i is s_i = (x̂0_i − y)/σ̃² (Tweedie). The
"target-score" family of drifts v = ½(1 + ξ²) (dσ̃²/dτ) Σ β_i s_i — what a stochastic solver integrates when x̂0 is
replaced by x̂0' = Σ β_i x̂0_i + (1 − Σ β_i) y, so that (x̂0' − y)/σ̃² = Σ β_i s_i — has, for *any* noise level ξ
of the reverse SDE, the potential (all Laplacians cancel; the research notes' derivation, matching the official
code's CFG weights)

    dw = ½ (‖Σ β_i s_i‖² − Σ β_i ‖s_i‖²) dσ̃²,    dσ̃² = −d(σ̃²) > 0 along the sampler,

with the special cases β(β − 1)/2 ‖s‖² dσ̃² (annealing), ⟨s_1, s_2⟩ dσ̃² (product of two experts) and
w(w − 1)/2 ‖s_c − s_u‖² dσ̃² (CFG as a geometric average; ≥ 0 for w > 1). Each step adds the left-point (Euler in
time) increment Δw = ½ (‖Σ β_i s_i‖² − Σ β_i ‖s_i‖²)·(σ̃_k² − σ̃_{k+1}²) of its own level σ̃_k and the next one
σ̃_{k+1} (0 after the last step), as the official code does; it is computed cancellation-free as
½ ρ [B(B − 1)‖r_1‖² + 2(B − 1)⟨r_1, E⟩ + ‖E‖² − Σ_{i>1} β_i ‖e_i‖²] with r_i = (α x̂0_i − x)/σ = σ̃_k s_i,
e_i = α (x̂0_i − x̂0_1)/σ, E = Σ_{i>1} β_i e_i, B = Σ β_i and ρ = 1 − σ̃_{k+1}²/σ̃_k², summed over each sample's
values in float64 — finite also at α = 0 (a rectified flow's pure noise).

**The start.** The particles start from the sampler's N(0, s² I), not from p_T ∝ Π q_T^{β_i}. By default no initial
weight corrects it, as in the official code: for Σβ > 1 the target-score dynamics forget their start quickly, and
the tests measure no bias; for Σβ < 1 they forget it slowly (β = 0.5 leaves a variance ≈ 2–4 % too large on the
test mixture). ``prior_correction=True`` adds w_0 = −(Σβ − 1)‖x_T‖²/(2 s²) at the first step (each q_T taken as
N(0, s² I)): exact as α_T → 0, but heavy-tailed for Σβ < 1 and, on high-dimensional data, a collapse of the
effective sample size at the first step.

**Model calls.** One per distinct condition and step. The step's own call serves the first expert (the "cond" one
if there is one): the ``condition`` hook makes it a plain conditional call, ``Conditions(c_1, None, None)``, so the
run's own classifier-free guidance is off (this guidance *is* the guidance). The other experts' x̂0 come from extra
calls of ``ctx.run.denoiser.predict_x0`` at the same point, batched into one call where their conditions stack
(mappings with the same keys whose tensors have batch size 1 or B). Annealing costs nothing extra; a product of two
experts or CFG costs one extra call of the batch (as CFG's batched call does), each further expert one more.

**Particles.** Groups of K consecutive rows, the resampling schedule and schemes, the ancestry records and the
streams are those of :mod:`diffsamplers.guidance.particles` (key ``"fk-correctors"``). The increments are added
at every step; ``interval``, ``start`` and ``ess_threshold`` only decide where the accumulated weights resample
(the official code resamples at every step). The sampler must be stochastic (SDE-DPM-Solver++, DDIM with η > 0,
Euler–Maruyama; ``ValueError`` otherwise); the weights hold for any noise level ξ of the solver, since the
target-score drift is built into x̂0. With K = 1 the weights are dropped and the sampler follows the target-score
SDE alone, which does not sample the product (the tests show it).

``clamp`` is the official code's stabilisation heuristic: each step's increments are centred per group and clamped
to [−clamp, clamp]. It bounds the weights' variance on high-dimensional data but **biases the target**; off by
default.

**Host reads.** None in the step: log-weights are float64 on the device; the resampler's checks are those of
:mod:`diffsamplers.guidance.resampling`. Not for the diffusers adapters (they call the model outside, so
``guide_x0`` never runs: ``ValueError``) nor for DC-Solver's ratio search. Under the exposure-bias time shift the
scores use each sample's own level and the step's length uses the plan's next level σ̃_{k+1}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..step import Conditions, Move, StepContext
from .particles import ParticleGuidance

__all__ = ["Expert", "FeynmanKacCorrector"]

#: The expert conditions that refer to the run's own inputs.
RUN_CONDITIONS = ("cond", "uncond")


@dataclass(frozen=True)
class Expert:
    """One factor q_t(x | c)^β of the target.

    Args:
        beta: the exponent β (finite; negative allowed, e.g. the unconditional factor 1 − w of CFG with w > 1).
        cond: ``"cond"`` — the run's conditions (``sample(..., cond=...)``, per sample, gathered with the
            particles); ``"uncond"`` — the run's unconditional inputs (``sample(..., uncond=...)``); or a mapping
            of model inputs used as given, e.g. ``{"class_labels": torch.tensor([3])}``. A mapping's tensors must
            not depend on the sample: a first dimension of 1 is broadcast to the batch (as the denoiser does), and a
            tensor with the batch size of a chunk would not follow the particles when they are resampled. An empty
            mapping ``{}`` calls the model without inputs (the unconditional model of many test models).
    """

    beta: float
    cond: Mapping[str, Any] | str = "cond"

    def __post_init__(self) -> None:
        try:
            beta = float(self.beta)
        except (TypeError, ValueError):
            raise ValueError(f"an expert's β must be a finite number, got {self.beta!r}") from None
        if not math.isfinite(beta):
            raise ValueError(f"an expert's β must be a finite number, got {self.beta!r}")
        object.__setattr__(self, "beta", beta)
        if isinstance(self.cond, str):
            if self.cond not in RUN_CONDITIONS:
                raise ValueError(f"an expert's cond must be 'cond', 'uncond' or a mapping, got {self.cond!r}")
        elif not isinstance(self.cond, Mapping):
            raise ValueError(f"an expert's cond must be 'cond', 'uncond' or a mapping, got {type(self.cond).__name__}")


class FeynmanKacCorrector(ParticleGuidance):
    """Feynman–Kac correctors (Skreta et al. 2025) towards p_t ∝ Π_i q_t(x | c_i)^{β_i} with K particles per group
    (module docstring: the weighted SDE, eqs. 7, 8, 10, Props. 3.2–3.3).

    Args:
        experts: the factors (:class:`Expert`), at least one, Σ β_i > 0; experts with the same ``cond`` (the same
            string, or the same mapping object) are merged by adding their β, and factors with β = 0 are dropped.
        num_particles: K, the particles per group (consecutive rows; the batch size a multiple of K).
        interval, start, ess_threshold, scheme, resample_final: the resampling schedule
            (:class:`~diffsamplers.guidance.particles.ParticleGuidance`); the weights accumulate at every step.
        clamp: ``None`` (default, unbiased) or a bound > 0: each step's increments are centred per group and clamped
            to [−clamp, clamp] (the official code's heuristic; biases the target).
        prior_correction: add the Gaussian initial weight w_0 at the first step (module docstring, "the start").

    Constructors for the paper's three applications: :meth:`annealing`, :meth:`product`, :meth:`classifier_free`.
    After sampling, :attr:`history` and :attr:`log_weights` are those of the base class.
    """

    stream = "fk-correctors"

    def __init__(
        self,
        experts: Sequence[Expert],
        num_particles: int,
        *,
        interval: int = 1,
        start: float = 1.0,
        ess_threshold: float | None = None,
        scheme: str = "systematic",
        resample_final: bool = True,
        clamp: float | None = None,
        prior_correction: bool = False,
    ):
        if isinstance(experts, Expert):
            experts = (experts,)
        experts = tuple(experts)
        if not experts:
            raise ValueError("FeynmanKacCorrector needs at least one expert, got none")
        for e in experts:
            if not isinstance(e, Expert):
                raise TypeError(f"experts must be Expert objects, got {type(e).__name__}")
        total = sum(e.beta for e in experts)
        if not total > 0:
            raise ValueError(
                f"the experts' β must sum to a positive number (Π q^β is not normalisable otherwise), got {total!r}"
            )
        if clamp is not None:
            clamp = float(clamp)
            if not (math.isfinite(clamp) and clamp > 0):
                raise ValueError(f"clamp must be None or a finite number > 0, got {clamp!r}")
        super().__init__(
            num_particles,
            interval=interval,
            start=start,
            ess_threshold=ess_threshold,
            scheme=scheme,
            resample_final=resample_final,
        )
        self.experts = experts
        self.clamp = clamp
        self.prior_correction = bool(prior_correction)
        self._terms = _merge(experts)
        self._incoming: tuple[int, range, Conditions] | None = None
        self._pending: tuple[int, range, torch.Tensor] | None = None

    # -- the paper's applications -------------------------------------------------------------------
    @classmethod
    def annealing(cls, beta: float, num_particles: int, **kwargs: Any) -> FeynmanKacCorrector:
        """Temperature annealing p ∝ q(x | c)^β on the run's conditions (Prop. 3.2, the target-score SDE): β > 1
        sharpens, β < 1 flattens. No extra model call."""
        beta_f = float(beta)
        if not (math.isfinite(beta_f) and beta_f > 0):
            raise ValueError(f"the annealing exponent β must be a finite number > 0, got {beta!r}")
        return cls([Expert(beta_f, "cond")], num_particles, **kwargs)

    @classmethod
    def product(
        cls,
        conds: Sequence[Mapping[str, Any] | str],
        num_particles: int,
        betas: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> FeynmanKacCorrector:
        """A product of experts Π_i q(x | c_i)^{β_i} (Prop. 3.3), β_i = 1 by default, e.g. two class conditions
        ``[{"class_labels": torch.tensor([3])}, {"class_labels": torch.tensor([5])}]``; one extra call per expert
        beyond the first."""
        if isinstance(conds, str | Mapping):
            raise ValueError("conds must be a sequence of conditions (mappings, 'cond' or 'uncond')")
        conds = list(conds)
        betas = [1.0] * len(conds) if betas is None else list(betas)
        if len(betas) != len(conds):
            raise ValueError(f"got {len(betas)} betas for {len(conds)} conditions")
        return cls([Expert(b, c) for c, b in zip(conds, betas)], num_particles, **kwargs)

    @classmethod
    def classifier_free(cls, scale: float, num_particles: int, **kwargs: Any) -> FeynmanKacCorrector:
        """Classifier-free guidance as the geometric average q(x)^{1−w} q(x | c)^w (Prop. 3.3): the drift is CFG's,
        the weights make the particles follow the average. Needs ``sample(..., cond=..., uncond=...)``; one extra
        call (the unconditional one)."""
        w = float(scale)
        if not math.isfinite(w):
            raise ValueError(f"the guidance scale must be finite, got {scale!r}")
        return cls([Expert(w, "cond"), Expert(1.0 - w, "uncond")], num_particles, **kwargs)

    # -- the hooks ----------------------------------------------------------------------------------
    def condition(self, ctx: StepContext, conditions: Conditions) -> Conditions:
        """The step's own call serves the first expert, as a plain conditional call (the run's CFG off)."""
        self._incoming = (ctx.index, ctx.rows, conditions)
        return Conditions(_resolve(self._terms[0][0], conditions), None, None)

    def guide_x0(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x̂0' = Σ β_i x̂0_i + (1 − Σ β_i) x/α (the target-score drift); stashes the step's log-weight increment."""
        incoming = self._incoming
        if incoming is not None and incoming[0] == ctx.index and incoming[1] == ctx.rows:
            conditions = incoming[2]
        else:
            conditions = Conditions(ctx.run.cond, ctx.run.uncond, ctx.run.guidance_scale)
        extra = _predict(ctx, x, [_resolve(spec, conditions) for spec, _ in self._terms[1:]])
        predictions = [x0, *(p.to(x0.dtype) for p in extra)]
        betas = [beta for _, beta in self._terms]
        increment = self.increment(ctx, x, predictions, betas)
        if ctx.index == 0 and self.prior_correction:
            increment = increment + self.prior_weight(ctx, x, betas)
        self._pending = (ctx.index, ctx.rows, increment)
        return _target_x0(ctx, x, predictions, betas)

    def transition(self, ctx: StepContext, move: Move) -> torch.Tensor:
        """Add the step's increment to the weights; resample at a weighting step."""
        out = move.result
        groups = self.groups(ctx, out.device)
        pending = self._pending
        if pending is None or pending[0] != ctx.index or pending[1] != ctx.rows:
            raise ValueError(
                "FeynmanKacCorrector computes its weights in its guide_x0 hook, which did not run at step "
                f"{ctx.index + 1}: it needs the model called through sample() (not a diffusers adapter or a given x̂0)"
            )
        self._pending = None
        increment = pending[2].to(out.device)
        if self.clamp is not None:
            per_group = increment.view(-1, self.num_particles)
            centred = per_group - per_group.mean(dim=1, keepdim=True)
            increment = centred.clamp(-self.clamp, self.clamp).flatten()
        groups.reweight(increment)
        if not self.is_weighting_step(ctx.index, ctx.num_evals, ctx.time):
            return out
        return self.weigh_and_resample(ctx, groups, out)

    # -- the weights --------------------------------------------------------------------------------
    @staticmethod
    def prior_weight(ctx: StepContext, x: torch.Tensor, betas: Sequence[float]) -> torch.Tensor:
        """w_0 = −(Σβ − 1)‖x_T‖²/(2 s²) per sample, float64 ``(B,)``: the initial weight from the sampler's start
        N(0, s² I) (s the plan's initial noise scale) to p̃_T = Π q_T^{β_i}, each q_T taken as that same Gaussian."""
        scale = float(ctx.plan.init_noise_sigma)
        total = float(sum(betas))
        return -(total - 1.0) * x.detach().reshape(x.shape[0], -1).to(torch.float64).square().sum(1) / (2 * scale**2)

    @staticmethod
    def increment(
        ctx: StepContext, x: torch.Tensor, predictions: Sequence[torch.Tensor], betas: Sequence[float]
    ) -> torch.Tensor:
        """Δw = ½ (‖Σ β_i s_i‖² − Σ β_i ‖s_i‖²)·(σ̃_k² − σ̃_{k+1}²) per sample, float64 ``(B,)`` (module docstring),
        from the experts' x̂0 at the step's point (``predictions``, the first one's expert first)."""
        batch = x.shape[0]
        alpha, sigma = _per_sample(ctx.alpha, batch, x.device), _per_sample(ctx.sigma, batch, x.device)
        nxt = float(ctx.plan.sigmas[ctx.index + 1]) if ctx.index + 1 < len(ctx.plan.sigmas) else 0.0
        rho = 1.0 - (nxt * alpha / sigma) ** 2  # 1 − σ̃_{k+1}²/σ̃_k²
        scale = (alpha / sigma).view(-1, 1)
        first = predictions[0].detach().reshape(batch, -1).to(torch.float64)
        r1 = scale * first - x.detach().reshape(batch, -1).to(torch.float64) / sigma.view(-1, 1)
        total = float(sum(betas))
        bracket = total * (total - 1.0) * (r1 * r1).sum(1)
        if len(predictions) > 1:
            big_e = torch.zeros_like(r1)
            for p, beta in zip(predictions[1:], betas[1:]):
                e = scale * (p.detach().reshape(batch, -1).to(torch.float64) - first)
                big_e += beta * e
                bracket -= beta * (e * e).sum(1)
            bracket += 2.0 * (total - 1.0) * (r1 * big_e).sum(1) + (big_e * big_e).sum(1)
        return 0.5 * rho * bracket


def _merge(experts: Sequence[Expert]) -> list[tuple[Mapping[str, Any] | str, float]]:
    """(cond, β) per distinct condition (strings by value, mappings by identity), β summed, zeros dropped; the
    "cond" expert first (the step's own call serves it), else the first."""
    terms: dict[Any, list[Any]] = {}
    for e in experts:
        key = e.cond if isinstance(e.cond, str) else id(e.cond)
        if key in terms:
            terms[key][1] += e.beta
        else:
            terms[key] = [e.cond, e.beta]
    merged = [(cond, beta) for cond, beta in terms.values() if beta != 0.0]
    merged.sort(key=lambda t: 0 if t[0] == "cond" else 1)  # stable: otherwise the given order
    return merged


def _resolve(spec: Mapping[str, Any] | str, conditions: Conditions) -> Any:
    if spec == "cond":
        return conditions.cond
    if spec == "uncond":
        if conditions.uncond is None:
            raise ValueError(
                "an expert on 'uncond' needs the run's unconditional inputs: pass uncond=... to sample() "
                "(or give the expert an explicit mapping of model inputs)"
            )
        return conditions.uncond
    return spec


def _per_sample(value: Any, batch: int, device: torch.device) -> torch.Tensor:
    """α or σ (a host float or a per-sample tensor) as a float64 ``(B,)`` tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(-1).expand(batch)
    return torch.full((batch,), float(value), dtype=torch.float64, device=device)


def _target_x0(
    ctx: StepContext, x: torch.Tensor, predictions: Sequence[torch.Tensor], betas: Sequence[float]
) -> torch.Tensor:
    """x̂0' = x̂0_1 + Σ_{i>1} β_i (x̂0_i − x̂0_1) + (B − 1)(x̂0_1 − x/α), whose score is Σ β_i s_i."""
    first = predictions[0]
    out = first
    for p, beta in zip(predictions[1:], betas[1:]):
        out = out + beta * (p - first)
    total = float(sum(betas))
    if total != 1.0:
        alpha = ctx.alpha
        if not isinstance(alpha, torch.Tensor) and float(alpha) == 0.0:
            raise ValueError(
                f"the target-score x̂0 needs α > 0 when Σβ = {total:g} ≠ 1: the schedule starts at pure noise "
                "(α = 0, a rectified flow's t = 1); start it just below"
            )
        out = out + (total - 1.0) * (first - x.to(first.dtype) / alpha)
    return out


_UNSTACKABLE = object()


def _stack(values: Sequence[Any], batch: int) -> Any:
    """The conditions ``values`` as one batch of len(values)·B rows (tensors of batch size 1 or B expanded and
    concatenated, equal other values kept), or ``_UNSTACKABLE``."""
    first = values[0]
    if all(isinstance(v, Mapping) for v in values):
        keys = set(first)
        if any(set(v) != keys for v in values):
            return _UNSTACKABLE
        out = {}
        for k in first:
            s = _stack([v[k] for v in values], batch)
            if s is _UNSTACKABLE:
                return _UNSTACKABLE
            out[k] = s
        return out
    if all(isinstance(v, torch.Tensor) for v in values):
        if all(v.ndim >= 1 and v.shape[0] in (1, batch) for v in values):
            if len({(tuple(v.shape[1:]), v.dtype, v.device) for v in values}) != 1:
                return _UNSTACKABLE
            return torch.cat([v.expand(batch, *v.shape[1:]) for v in values])
        return first if all(v is first for v in values) else _UNSTACKABLE
    if all(v is first for v in values):
        return first
    return _UNSTACKABLE


def _repeat(value: Any, copies: int, batch: int) -> Any:
    """A per-sample tensor (first dimension B) repeated ``copies`` times along it; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.ndim - 1)))
    return value


def _predict(ctx: StepContext, x: torch.Tensor, conds: Sequence[Any]) -> list[torch.Tensor]:
    """x̂0 under each of ``conds`` at the step's point: one batched call where the conditions stack."""
    if not conds:
        return []
    denoiser = ctx.run.denoiser
    if denoiser is None:
        raise ValueError("FeynmanKacCorrector calls the model for its other experts, and this run has no denoiser")
    batch = x.shape[0]
    stacked = _stack(conds, batch) if len(conds) > 1 else _UNSTACKABLE
    if stacked is not _UNSTACKABLE:
        m = len(conds)
        out = denoiser.predict_x0(
            _repeat(x, m, batch),
            _repeat(ctx.timestep, m, batch),
            _repeat(ctx.alpha, m, batch),
            _repeat(ctx.sigma, m, batch),
            cond=stacked,
        )
        return list(out.split(batch))
    return [denoiser.predict_x0(x, ctx.timestep, ctx.alpha, ctx.sigma, cond=c) for c in conds]
