"""The self-guided minority sampler (Um & Ye, "Self-Guided Generation of Minority Samples Using Diffusion Models",
ECCV 2024, arXiv:2407.11555; official code ``soobin-um/sg-minority``, ``compute_mg_grad``) — classifier-free.

Tweedie's x̂0 is biased toward the majority of the data, so how far the model's reconstruction of its own
estimate moves measures how unusual that estimate is (the paper's "minority score at inference", Sec. 3.2). At
a guided step with sample x_t:

1. x̂0 = D(x_t, t) with the graph to x_t (the step's own model call, :attr:`~diffsamplers.step.Guidance.needs_grad`);
2. re-noise it to a fixed larger level s, x_s = α_s·sg[x̂0] + σ_s·ε, ε from the sample's own random stream
   (:meth:`~diffsamplers.step.StepContext.noise`): the paper's ``p_ratio`` p = 0.8 of the way to noise, here the
   normalised time s = p (1 = noise; DDPM: timestep 0.8·(N − 1) = 799.2 of 1000, where the official respaced
   index ⌊0.8·250⌋ = 200 maps to step 802);
3. denoise it again under stop-gradient (``torch.no_grad``, with this step's conditions):
   x̂0' = sg[D(x_s, s)] — the re-noising path carries no gradient;
4. the loss L(x_t) = d(x̂0, x̂0') (the paper's Eq. 8), d the ℓ2 norm by default (the official ``norm_for_mg = 2``:
   the norm, not its square — the two give the same direction after step 6), ``l1``, LPIPS where its weights are
   on disk, or any callable;
5. g = ∇ₓ Σ_b L_b — per sample, since the samples are independent;
6. ĝ = g / max(‖g‖_∞, ε), per sample (``use_normed_grad``; ε guards 0/0, which the official code does not);
7. ascent on L, written as a change of x̂0 (below).

**The update in x̂0 form.** The paper shifts the ancestral (DDPM) mean, μ ← μ_θ(x_t) + w·Σ_θ(x_t)·ĝ
(``mg_scale_type = 'var'``, Eq. 9). A step of this package is linear in x̂0, and for the DDPM posterior from level t
to the next level s (x_u = α_u x0 + σ_u ε) the mean's x0 coefficient is c₀ = α_s σ²_{t|s}/σ_t² and the (fixed,
small) variance Σ = σ²_{t|s} σ_s²/σ_t², with σ²_{t|s} = σ_t² − (α_t/α_s)² σ_s². So μ + w Σ ĝ is the mean of x̂0 + w·(Σ/c₀)·ĝ,
and Σ/c₀ = σ_s²/α_s does not depend on t:

    x̂0 ← x̂0 + sign·w·c·ĝ,   c = σ_s²/α_s = σ̃_s²·α_s  at the plan's next level s   (``variance="posterior"``)

— for DDIM with η = 1 (ancestral DDPM with Σ = β̃) exactly the paper's update with the paper's w (tested), and on any
other solver the same change of x̂0; c = 0 at a last step to σ̃ = 0 (the paper's Σ_θ = 0 at t = 0).
``variance="score"`` takes c = σ_t²/α_t at the evaluation point instead: by Tweedie, x̂0 = (x_t + σ_t² ∇log p_t)/α_t,
so this adds w·ĝ to the score — the same as the paper's mean shift to first order in the step size (c_score/c_post =
σ̃_t² α_t/(σ̃_s² α_s) → 1), larger at coarse steps and at the last one. A deterministic (ODE) solver moves x by about
half as much as the ancestral step for the same x̂0 change (the probability-flow ODE carries half the score term).

**Time scheduling** (the paper's Sec. 3.3). The guidance acts at evaluation k of a plan of K evaluations only if
(K − 1 − k) mod ``every`` = 0 — intermittent guidance, the official ``t % inter_rate == 0`` on the respaced index
t = K − 1 − k, so the last evaluation is a candidate (default every = 5) — and, with ``cutoff`` set, only while
the normalised time is above it (the official ``t > N·t_mid``; its default t_mid = −1 means always; cutoff = 0.2
switches guidance off for the last 20 % of the time). A step to σ̃ = 0 has c = 0 (below) and is skipped, gradient
and all. :meth:`SelfGuidedMinority.schedule` lists the guided evaluations of a plan.

**Published settings** (official README, 250 ancestral steps, ADM models): w = 0.4 (CelebA 64), w = 0.2 with
every = 2 (ImageNet 64), p = 0.8, LPIPS-AlexNet distance, one re-noise draw. With fewer steps the same every = k
guides fewer evaluations; what a w means then is measured in ``docs/guidance.md``.

**Cost and memory.** A guided step costs one more forward (the re-noised x̂0, no graph) and one backward; the
step's own call builds a graph only at guided steps (:meth:`needs_grad_at`). With ``chunk_size`` the gradient is
computed ``chunk_size`` samples at a time — the step's call then builds no graph and each chunk re-evaluates x̂0
with one (one forward more per guided step), so the graph held at once is that of one chunk. Nothing keeps a graph
beyond the step: the change of x̂0 is a detached tensor. A model that gives no gradient (x̂0 off the autograd graph,
not depending on x, or a gradient that is zero for every sample) raises a ``ValueError`` naming it; the last check
reads the device once per run, at its first guided step.

``sign = -1`` descends L instead ("majority guidance", the ablation; reconstructions become more typical).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from ..denoiser import slice_cond
from ..distances import Distance, l1_distance, l2_distance, lpips_distance
from ..solvers.base import SolverPlan
from ..step import Guidance, StepContext, normalised_time

__all__ = ["DISTANCES", "SelfGuidedMinority", "reconstruction_distance"]

#: Named distances d(x̂0, x̂0') per sample; any callable ``d(a, b) -> (B,)`` works too.
DISTANCES = ("l2", "l1", "lpips")


def reconstruction_distance(name: str) -> Distance:
    """The per-sample distance named ``name``: ``l2`` / ``l1`` — the ℓp norm of the difference over all but the batch
    dimension (the official ``norm_for_mg``), ``lpips`` — :func:`lpips_distance`."""
    if name == "l2":
        return l2_distance
    if name == "l1":
        return l1_distance
    if name == "lpips":
        return lpips_distance("alex")  # the paper's default d
    raise ValueError(f"self-guided minority: unknown distance {name!r}: expected one of {', '.join(DISTANCES)}")


def _rows(value: Any, rows: slice, batch: int) -> Any:
    """Rows ``rows`` of a per-sample tensor (first dimension ``batch``); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[rows]
    return value


class SelfGuidedMinority(Guidance):
    """Self-guided minority guidance (Um & Ye 2024; see the module docstring for the algorithm and conventions).

    Args:
        w: the guidance scale (≥ 0, finite), the paper's ``mg_scale``: x̂0 ← x̂0 + sign·w·c·ĝ; 0 is the unguided
            sampler exactly.
        level: the re-noise level p ∈ (0, 1] as a normalised time (1 = noise), the paper's ``p_ratio`` (0.8).
        every: guide every ``every``-th model evaluation counted from the last one (≥ 1), the paper's
            ``inter_rate`` (5).
        cutoff: no guidance at normalised times ≤ ``cutoff`` (in [0, 1)), the paper's ``t_mid``; ``None`` = always.
        sign: +1 ascends the reconstruction loss (minority), −1 descends it (majority guidance, the ablation).
        chunk_size: compute the gradient this many samples at a time (bounded memory); ``None`` = the whole batch.
        draws: re-noise draws averaged in L (the paper's ``num_mc_samples``, 1).
        distance: ``"l2"`` (default), ``"l1"``, ``"lpips"`` (weights must be on disk) or a callable
            ``d(x̂0, x̂0') -> (B,)``.
        variance: ``"posterior"`` (c = σ_s²/α_s at the plan's next level: the paper's DDPM mean shift) or
            ``"score"`` (c = σ_t²/α_t at the evaluation point: w·ĝ added to the score).
        eps: the guard of the ℓ∞ normalisation.
        model_name: how errors name the model (by default its class name).
    """

    needs_grad = True

    def __init__(
        self,
        w: float,
        *,
        level: float = 0.8,
        every: int = 5,
        cutoff: float | None = None,
        sign: int = 1,
        chunk_size: int | None = None,
        draws: int = 1,
        distance: str | Distance = "l2",
        variance: str = "posterior",
        eps: float = 1e-12,
        model_name: str | None = None,
    ):
        self.w = self._check_w(w)
        self.level = self._check_level(level)
        self.every = self._check_count("every (k)", every)
        if cutoff is not None and (isinstance(cutoff, bool) or not 0.0 <= float(cutoff) < 1.0):
            raise ValueError(f"self-guided minority: cutoff (t_mid) must be a time in [0, 1) or None, got {cutoff!r}")
        self.cutoff = None if cutoff is None else float(cutoff)
        if sign not in (1, -1) or isinstance(sign, bool):
            raise ValueError(f"self-guided minority: sign must be +1 (minority) or -1 (majority), got {sign!r}")
        self.sign = int(sign)
        self.chunk_size = None if chunk_size is None else self._check_count("chunk", chunk_size)
        self.draws = self._check_count("draws", draws)
        if variance not in ("posterior", "score"):
            raise ValueError(f"self-guided minority: variance must be 'posterior' or 'score', got {variance!r}")
        self.variance = variance
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"self-guided minority: eps must be a finite number > 0, got {eps!r}")
        self.eps = float(eps)
        self.distance_name = distance if isinstance(distance, str) else getattr(distance, "__name__", "callable")
        self.distance = reconstruction_distance(distance) if isinstance(distance, str) else distance
        self.model_name = model_name
        self._checked: weakref.ref[Any] | None = None  # the run whose gradient was last checked (not kept alive)

    @staticmethod
    def _check_w(w: Any) -> float:
        value = float("nan") if isinstance(w, bool) or not isinstance(w, (int, float)) else float(w)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"self-guided minority: w must be a finite number ≥ 0, got {w!r}")
        return value

    @staticmethod
    def _check_level(level: Any) -> float:
        value = float("nan") if isinstance(level, bool) or not isinstance(level, (int, float)) else float(level)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"self-guided minority: level p (the re-noise time) must lie in (0, 1], got {level!r}")
        return value

    @staticmethod
    def _check_count(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"self-guided minority: {name} must be an integer ≥ 1, got {value!r}")
        return value

    # -- schedule ---------------------------------------------------------------------------------------
    def guided(self, plan: SolverPlan, index: int) -> bool:
        """Whether evaluation ``index`` of ``plan`` is guided: w > 0, (K − 1 − index) mod every = 0, above the cut-off,
        and c ≠ 0 (under ``variance="posterior"`` a step to σ̃ = 0 changes nothing: no gradient is computed there)."""
        if self.w == 0.0 or (plan.num_evals - 1 - index) % self.every != 0:
            return False
        if self.variance == "posterior" and float(plan.sigmas[index + 1]) == 0.0:
            return False
        return self.cutoff is None or normalised_time(plan, index) > self.cutoff

    def schedule(self, plan: SolverPlan) -> list[int]:
        """The evaluation indices of ``plan`` this guidance acts at."""
        return [i for i in range(plan.num_evals) if self.guided(plan, i)]

    def _active(self, ctx: StepContext) -> bool:
        return self.guided(ctx.plan, ctx.index)

    def _chunked(self, batch: int) -> bool:
        return self.chunk_size is not None and self.chunk_size < batch

    def needs_grad_at(self, ctx: StepContext) -> bool:
        """The step's own call keeps its graph only at a guided step computed in one piece."""
        return self._active(ctx) and not self._chunked(len(ctx.rows))

    # -- the update -------------------------------------------------------------------------------------
    def scale(self, ctx: StepContext) -> Any:
        """c of x̂0 ← x̂0 + sign·w·c·ĝ at this step (a float, or per sample under the time shift)."""
        if self.variance == "score":
            return ctx.sigma * ctx.sigma / ctx.alpha
        process = ctx.plan.process
        sigma_tilde = float(ctx.plan.sigmas[ctx.index + 1])
        alpha = float(process.alpha_sigma(sigma_tilde)[0])
        return sigma_tilde * sigma_tilde * alpha

    def guide_x0(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if not self._active(ctx):
            return x0
        g = self.gradient(ctx, x, x0)
        return x0 + (self.sign * self.w * self.scale(ctx)) * g.to(x0.dtype)

    def targets(self, ctx: StepContext, x0: torch.Tensor) -> list[torch.Tensor]:
        """sg[x̂0'] = D(α_s·x̂0 + σ_s·ε, s) for each re-noise draw, under ``torch.no_grad`` (steps 2–3)."""
        process = ctx.plan.process
        t = self.level * float(process.t_max)
        alpha, sigma = (float(v) for v in process.alpha_sigma(process.sigma_tilde(t)))
        clean = x0.detach()
        out = []
        with torch.no_grad():
            for _ in range(self.draws):
                eps = ctx.noise("self-minority", clean.shape[1:], clean.device, clean.dtype)
                out.append(ctx.denoise(alpha * clean + sigma * eps, self.level).detach())
        return out

    def loss(self, x0: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """L per sample: d(x̂0, sg[x̂0']) averaged over the re-noise draws (step 4)."""
        return torch.stack([self.distance(x0, t).reshape(-1) for t in targets]).mean(0)

    def gradient(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ĝ = ∇ₓL / max(‖∇ₓL‖_∞, ε) per sample (steps 2–6), in chunks of ``chunk_size`` samples where set.

        ``x0`` is the step's x̂0: with its graph to ``x`` when computed in one piece (then used as it is), else
        re-evaluated chunk by chunk at the step's point and conditions."""
        targets = self.targets(ctx, x0)
        batch = x.shape[0]
        if not self._chunked(batch) and x0.requires_grad:
            g = self._grad(ctx, self.loss(x0, targets), x)
        else:
            size = batch if self.chunk_size is None else self.chunk_size
            parts = []
            for start in range(0, batch, size):
                rows = slice(start, min(start + size, batch))
                parts.append(self._chunk_grad(ctx, x, rows, [t[rows] for t in targets]))
            g = torch.cat(parts)
        if self._checked is None or self._checked() is not ctx.run:  # one host read per run, at its first guided step
            if not bool((g != 0).any()):
                raise ValueError(self._no_gradient("its gradient is zero for every sample", ctx))
            self._checked = weakref.ref(ctx.run)
        peak = g.abs().flatten(1).amax(dim=1).clamp_min(self.eps)
        return g / peak.view(-1, *([1] * (g.ndim - 1)))

    def _chunk_grad(self, ctx: StepContext, x: torch.Tensor, rows: slice, targets: list[torch.Tensor]) -> torch.Tensor:
        """∇ₓL for the samples ``rows``: x̂0 re-evaluated at the step's point with a graph to those rows only."""
        run, batch = ctx.run, x.shape[0]
        assert run.denoiser is not None
        c = ctx.conditions
        if c is None:
            cond, uncond, scale = run.cond, run.uncond, run.guidance_scale
        else:
            cond, uncond, scale = c.cond, c.uncond, c.guidance_scale
        with torch.enable_grad():
            xc = x[rows].detach().requires_grad_(True)
            x0c = run.denoiser.predict_x0(
                xc,
                _rows(ctx.timestep, rows, batch),
                _rows(ctx.alpha, rows, batch),
                _rows(ctx.sigma, rows, batch),
                cond=slice_cond(cond, rows.start, rows.stop, batch),
                uncond=slice_cond(uncond, rows.start, rows.stop, batch),
                guidance_scale=scale,
            )
            return self._grad(ctx, self.loss(x0c, targets), xc)

    def _grad(self, ctx: StepContext, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """∇ₓ Σ L, or a ValueError naming the model when x̂0 has no graph to x."""
        if not loss.requires_grad:
            raise ValueError(self._no_gradient("its x̂0 has no autograd graph", ctx))
        (g,) = torch.autograd.grad(loss.sum(), x, retain_graph=True, allow_unused=True)
        if g is None:
            raise ValueError(self._no_gradient("its x̂0 does not depend on x through autograd", ctx))
        return g.detach()

    def _no_gradient(self, why: str, ctx: StepContext | None = None) -> str:
        name = self.model_name
        if name is None and ctx is not None and ctx.run.denoiser is not None:
            name = type(ctx.run.denoiser.model).__name__
        return (
            f"self-guided minority guidance needs ∇ₓ x̂0, but the model {name or '(unnamed)'} gives none ({why}): "
            "a model run under torch.no_grad, detached or computed off the graph cannot be guided by its gradient"
        )

    def __repr__(self) -> str:
        return (
            f"SelfGuidedMinority(w={self.w:g}, level={self.level:g}, every={self.every}, cutoff={self.cutoff}, "
            f"sign={self.sign:+d}, chunk_size={self.chunk_size}, draws={self.draws}, distance={self.distance_name!r}, "
            f"variance={self.variance!r})"
        )
