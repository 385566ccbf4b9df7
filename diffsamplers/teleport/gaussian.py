"""Gaussian (analytical) teleportation: skip the first sampling steps with the closed-form Gaussian flow.

Wang & Vastola 2024, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models
and its Applications" (TMLR; arXiv:2412.09726; code Animadversio/GaussianTeleportationDiffusion). At high
noise a trained model's score is close to that of the Gaussian N(μ, Σ) with the data's moments, whose
probability-flow ODE has a closed-form solution; the first 15–30 % of the steps can be replaced by it.

Closed form for any noise process x_t = α_t x0 + σ_t ε (the paper's Eq. for α = 1, generalised
here): along the exact PF-ODE of N(μ, U diag(λ) Uᵀ + ρ(I − UUᵀ)) the whitened coordinates
u_kᵀ(x_t − α_t μ)/√(α_t² λ_k + σ_t²) are constant, so from level s to level t

    x_t = α_t μ + U diag(√((α_t²λ + σ_t²)/(α_s²λ + σ_s²))) Uᵀ (x_s − α_s μ)
               + √((α_t²ρ + σ_t²)/(α_s²ρ + σ_s²)) (I − UUᵀ)(x_s − α_s μ)          (:func:`gaussian_flow`)

and the posterior mean is E[x0 | x_t] = μ + U diag(α_t λ/(α_t² λ + σ_t²)) Uᵀ (x_t − α_t μ) + (same with ρ)
(:class:`GaussianDenoiser`). All of it runs in float64.

Skip level (:func:`choose_skip`). The paper picks the number of skipped steps by sweeping it against FID and
motivates it by the Gaussian term explaining the learned score at high noise. Here the criterion is made
explicit and cheap: teleport probe noises to each grid level σ_k in turn, and at each level measure the
fraction of the model's x̂0 variation (across the probes) the Gaussian denoiser does not explain,

    e_k = Σ_b ‖D_θ(x_k,b) − D_G(x_k,b)‖² / Σ_b ‖D_θ(x_k,b) − mean_b D_θ(x_k,·)‖²;

the skip is the largest k with e_j ≤ ``tolerance`` for every j ≤ k (the landing level included), found top
down with one batched model call per level until the first failure. A level where the model's x̂0 does not
vary across the probes by more than :data:`RESOLUTION` times its floating-point resolution (eps of its dtype
× RMS x̂0) is not measured (e_k = NaN) and passes: there both denoisers equal the data mean μ to within the
model's rounding, so the ratio is rounding over rounding. This happens where α_k ≈ 0 — a rectified-flow
model's start at t = 1 − 10⁻⁶ (α = 10⁻⁶: x̂0 varies by ~10⁻⁷, e_0 ≈ 0.4 from float32 rounding alone); VP
grids start at α ≥ 0.006, 10⁵ resolutions of spread and more, and are always measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..denoiser import Denoiser
from ..noise import NoiseProcess
from ..rng import NoiseSource
from ..sampling import initial_noise, model_device, sample
from ..schedules.schedule import Schedule
from ..solvers.base import Solver
from .statistics import GaussianStatistics

__all__ = [
    "RESOLUTION",
    "GaussianDenoiser",
    "GaussianTeleport",
    "SkipChoice",
    "choose_skip",
    "gaussian_flow",
    "gaussian_posterior_mean",
]

#: :func:`choose_skip` measures e_k only where the spread of the model's x̂0 across the probes (RMS) exceeds this
#: many float resolutions (eps × RMS x̂0). The exact mixture's float32 x̂0 carries rounding of ~20 resolutions, so
#: at the threshold rounding alone adds e ≈ (20/1000)² = 4·10⁻⁴, below the tolerances in use (0.01, 0.05).
RESOLUTION = 1e3


def _scalar(v: Any) -> float:
    return float(np.asarray(v, dtype=np.float64))


Stats = GaussianStatistics | Mapping[int, GaussianStatistics]


def _per_class(
    stats: Stats, x: torch.Tensor, labels: torch.Tensor | None, fn: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``fn(stats, x, index)`` for one Gaussian, or per class (``labels``) for class-conditional statistics
    (``index``: the rows of x given, ``None`` for all)."""
    if isinstance(stats, GaussianStatistics):
        return fn(stats, x, None)
    if labels is None:
        raise ValueError("class-conditional statistics need the class labels of the samples")
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if labels.numel() != x.shape[0]:
        raise ValueError(f"got {labels.numel()} labels for {x.shape[0]} samples")
    out = None
    for c in labels.unique().tolist():
        if int(c) not in stats:
            raise ValueError(f"no statistics for class {int(c)} (have {sorted(stats)})")
        idx = torch.nonzero(labels == c).reshape(-1).to(x.device)
        part = fn(stats[int(c)], x.index_select(0, idx), idx)
        out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device) if out is None else out
        out.index_copy_(0, idx.to(part.device), part)
    return out


def gaussian_flow(
    stats: Stats,
    process: NoiseProcess,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact probability-flow ODE map of N(μ, Σ) data from noise level σ̃ = ``sigma_from`` to ``sigma_to``.

    ``x`` is in the process's own scaling at ``sigma_from``; the result, at ``sigma_to``, has x's dtype and
    device (the arithmetic is float64). With per-class statistics (a mapping) each sample uses its class's
    Gaussian (``labels``).
    """
    return _per_class(stats, x, labels, lambda st, xs, _: _flow(st, process, xs, sigma_from, sigma_to))


def _flow(
    stats: GaussianStatistics, process: NoiseProcess, x: torch.Tensor, sigma_from: float, sigma_to: float
) -> torch.Tensor:
    if not (np.isfinite(sigma_from) and np.isfinite(sigma_to)) or sigma_from < 0 or sigma_to < 0:
        raise ValueError(f"noise levels must be finite and non-negative, got {sigma_from} and {sigma_to}")
    if x.shape[1:].numel() != stats.dim:
        raise ValueError(f"sample shape {tuple(x.shape[1:])} does not match the statistics' {stats.sample_shape}")
    a0, s0 = (_scalar(v) for v in process.alpha_sigma(sigma_from))
    a1, s1 = (_scalar(v) for v in process.alpha_sigma(sigma_to))
    dev = x.device if x.device.type != "mps" else torch.device("cpu")
    mu, lam, u = (t.to(dev) for t in (stats.mean, stats.eigvals, stats.eigvecs))
    flat = x.detach().reshape(x.shape[0], -1).to(dev, torch.float64)
    centred = flat - a0 * mu
    coords = centred @ u
    scale = torch.sqrt((a1 * a1 * lam + s1 * s1) / (a0 * a0 * lam + s0 * s0))
    out = a1 * mu + (coords * scale) @ u.T
    if stats.rank < stats.dim:
        rho = stats.residual_variance
        res_scale = np.sqrt((a1 * a1 * rho + s1 * s1) / (a0 * a0 * rho + s0 * s0))
        out = out + res_scale * (centred - coords @ u.T)
    return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)


def gaussian_posterior_mean(
    stats: Stats,
    x: torch.Tensor,
    alpha: float | torch.Tensor,
    sigma: float | torch.Tensor,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """E[x0 | x_t = x] for N(μ, Σ) data, x_t = α x0 + σ ε (α, σ scalars, or per sample for one Gaussian)."""

    def rows(v: float | torch.Tensor, idx: torch.Tensor | None) -> float | torch.Tensor:
        per_sample = isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == x.shape[0] and idx is not None
        return v.index_select(0, idx.to(v.device)) if per_sample else v

    return _per_class(stats, x, labels, lambda st, xs, idx: _posterior_mean(st, xs, rows(alpha, idx), rows(sigma, idx)))


def _posterior_mean(
    stats: GaussianStatistics, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor
) -> torch.Tensor:
    b = x.shape[0]
    flat = x.reshape(b, -1).to(torch.float64)
    mu, lam, u = (t.to(x.device) for t in (stats.mean, stats.eigvals, stats.eigvecs))
    a = alpha.reshape(b, 1).double() if isinstance(alpha, torch.Tensor) else float(alpha)
    s = sigma.reshape(b, 1).double() if isinstance(sigma, torch.Tensor) else float(sigma)
    centred = flat - a * mu
    coords = centred @ u
    out = mu + (coords * (a * lam / (a * a * lam + s * s))) @ u.T
    if stats.rank < stats.dim:
        rho = stats.residual_variance
        out = out + (a * rho / (a * a * rho + s * s)) * (centred - coords @ u.T)
    return out.reshape(x.shape)


class GaussianDenoiser(Denoiser):
    """The Gaussian score approximation as a denoiser: x̂0 = E[x0 | x_t] under N(μ, Σ) (no network)."""

    def __init__(self, stats: Stats, process: NoiseProcess, cond_key: str = "class_labels"):
        super().__init__(lambda x, t: x, process, prediction_type="sample")
        self.stats, self.cond_key = stats, cond_key

    def predict_x0(self, x, timestep, alpha, sigma, cond=None, uncond=None, guidance_scale=None):  # noqa: D102
        work = torch.promote_types(x.dtype, torch.float32)
        labels = None if cond is None else cond.get(self.cond_key)
        return gaussian_posterior_mean(self.stats, x, alpha, sigma, labels).to(work)


@dataclass(frozen=True)
class SkipChoice:
    """The outcome of :func:`choose_skip`: skipped evaluations, the landing level and e_k per level tested (NaN
    where it is not measurable)."""

    skip: int
    sigma: float
    unexplained: tuple[float, ...]
    tolerance: float


def choose_skip(
    denoiser: Denoiser,
    stats: Stats,
    schedule: Schedule,
    tolerance: float = 0.01,
    num_probes: int = 64,
    seed: int = 0,
    max_fraction: float = 0.5,
    cond: Mapping[str, Any] | None = None,
    cond_key: str = "class_labels",
) -> SkipChoice:
    """The number of leading evaluations the Gaussian flow can replace (criterion in the module docstring).

    At most ``max_fraction`` of the evaluations are skipped. ``cond`` (model inputs for ``num_probes``
    samples) is passed to the model; with per-class statistics and no ``cond`` the probes cycle through the
    classes (``cond_key`` names the label input).
    """
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must lie in (0, 1), got {tolerance}")
    process = denoiser.process
    sigmas = schedule.sigmas
    ts = schedule.model_timesteps(process)
    if not isinstance(stats, GaussianStatistics) and cond is None:
        classes = torch.tensor(sorted(stats))
        cond = {cond_key: classes[torch.arange(num_probes) % classes.numel()]}
    labels = None if cond is None else cond.get(cond_key)
    device = model_device(denoiser)
    model_cond = (
        None if cond is None else {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    )
    shape = (stats if isinstance(stats, GaussianStatistics) else next(iter(stats.values()))).sample_shape
    x_T = initial_noise(process, float(sigmas[0]), (num_probes, *shape), seed, dtype=torch.float64)
    limit = min(int(max_fraction * schedule.num_steps), schedule.num_steps - 1)
    errors: list[float] = []
    skip = 0
    for k in range(limit + 1):
        x_k = gaussian_flow(stats, process, x_T, float(sigmas[0]), float(sigmas[k]), labels).float()
        alpha, sigma = (_scalar(v) for v in process.alpha_sigma(float(sigmas[k])))
        with torch.no_grad():
            model = denoiser.predict_x0(x_k.to(device), float(ts[k]), alpha, sigma, cond=model_cond)
        gauss = gaussian_posterior_mean(stats, x_k.double(), alpha, sigma, labels).flatten(1).cpu()
        err = _unexplained(model, gauss)
        errors.append(err)
        if err > tolerance:  # NaN (not measurable) passes
            break
        skip = k
    return SkipChoice(skip, float(sigmas[skip]), tuple(errors), float(tolerance))


def _unexplained(model: torch.Tensor, gauss: torch.Tensor) -> float:
    """e = Σ_b ‖D_θ − D_G‖² / Σ_b ‖D_θ − mean_b D_θ‖² (``model`` in its own dtype, ``gauss`` float64, flat per
    probe); NaN where the spread is below :data:`RESOLUTION` float resolutions of the model's x̂0."""
    eps = torch.finfo(model.dtype).eps
    x0 = model.double().flatten(1).cpu()
    spread = float((x0 - x0.mean(0)).pow(2).sum())
    floor = x0.numel() * (RESOLUTION * eps) ** 2 * float(x0.pow(2).mean())
    if not spread > floor:
        return math.nan
    return float((x0 - gauss).pow(2).sum()) / spread


class GaussianTeleport:
    """Teleport from the initial noise to a grid level with the Gaussian flow, then hand over to any solver.

    Args:
        stats: the data's Gaussian statistics, in the model's input space (for latent models: of the scaled
            latents; for [−1, 1] pixel models: of the [−1, 1] images); or per-class statistics
            (:func:`~diffsamplers.teleport.statistics.class_statistics`) for a class-conditional model, each sample
            then teleported with its class's Gaussian (labels from ``cond[cond_key]``).
        skip: number of leading evaluations to skip; or ``sigma_skip``: teleport to the first grid level at or
            below it; or neither: :func:`choose_skip` with ``tolerance`` decides (once per schedule).
    """

    def __init__(
        self,
        stats: GaussianStatistics,
        skip: int | None = None,
        sigma_skip: float | None = None,
        tolerance: float = 0.01,
        num_probes: int = 64,
        cond_key: str = "class_labels",
    ):
        if skip is not None and sigma_skip is not None:
            raise ValueError("give skip or sigma_skip, not both")
        if skip is not None and (isinstance(skip, bool) or int(skip) != skip or skip < 0):
            raise ValueError(f"skip must be a non-negative integer, got {skip!r}")
        if sigma_skip is not None and not (np.isfinite(sigma_skip) and sigma_skip > 0):
            raise ValueError(f"sigma_skip must be positive and finite, got {sigma_skip}")
        self.stats = stats
        self.skip, self.sigma_skip = skip, sigma_skip
        self.tolerance, self.num_probes = float(tolerance), int(num_probes)
        self.cond_key = cond_key
        self.last_choice: SkipChoice | None = None

    def resolve_skip(self, denoiser: Denoiser, schedule: Schedule, cond: Any = None) -> int:
        """How many leading evaluations of ``schedule`` are replaced by the teleport."""
        if self.skip is not None:
            k = int(self.skip)
        elif self.sigma_skip is not None:
            below = np.flatnonzero(schedule.sigmas[:-1] <= self.sigma_skip)
            k = int(below[0]) if below.size else schedule.num_steps
        else:
            self.last_choice = choose_skip(
                denoiser, self.stats, schedule, self.tolerance, self.num_probes, cond=cond, cond_key=self.cond_key
            )
            k = self.last_choice.skip
        if k >= schedule.num_steps:
            raise ValueError(f"cannot skip {k} of the schedule's {schedule.num_steps} evaluations")
        return k

    @staticmethod
    def remaining(schedule: Schedule, skip: int) -> Schedule:
        """The schedule after the first ``skip`` evaluations."""
        ts = None if schedule.timesteps is None else schedule.timesteps[skip:]
        return Schedule(schedule.sigmas[skip:], timesteps=ts, metadata={**schedule.metadata, "teleport_skip": skip})

    def sample(
        self,
        denoiser: Denoiser,
        solver: Solver,
        schedule: Schedule,
        shape: Sequence[int] | None = None,
        *,
        x_T: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        skip_cond: Any = None,
        callback: Callable | None = None,
        **sample_kwargs: Any,
    ) -> torch.Tensor:
        """Like :func:`diffsamplers.sample`, with the first evaluations replaced by the Gaussian flow.

        The solver then runs on the rest of the grid from the teleported state (a multistep solver restarts
        its history there). ``skip_cond`` is the condition passed to the model while choosing the skip.
        """
        process = denoiser.process
        k = self.resolve_skip(denoiser, schedule, cond=skip_cond)
        noise = sample_kwargs.pop("noise", None) or NoiseSource(generator=generator, seeds=seeds)
        if x_T is None:
            if shape is None:
                raise ValueError("give the batch shape (N, ...) or x_T")
            run_device = torch.device(device) if device is not None else model_device(denoiser)
            x_T = initial_noise(process, float(schedule.sigmas[0]), shape, noise, device=run_device, dtype=dtype)
        cond = sample_kwargs.get("cond")
        labels = None if cond is None else cond.get(self.cond_key)
        x_k = gaussian_flow(self.stats, process, x_T, float(schedule.sigmas[0]), float(schedule.sigmas[k]), labels)
        return sample(
            denoiser,
            solver,
            self.remaining(schedule, k),
            x_T=x_k.to(dtype),
            noise=noise,
            device=device,
            dtype=dtype,
            callback=callback,
            **sample_kwargs,
        )
